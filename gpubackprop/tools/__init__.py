"""Tools built on the public engine API: gradcheck, trace, plots, selftest."""

"""The Dockerfile, checked without Docker (none runs where the tests run): parsed with
dockerfile-parse and held against the repository and the Makefile."""

import io
import json
import re
import shlex
from pathlib import Path

import pytest

DockerfileParser = pytest.importorskip("dockerfile_parse", reason="needs the test extra's dockerfile-parse").DockerfileParser

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
if not DOCKERFILE.is_file() or not (ROOT / "gpubackprop").is_dir():
    # e.g. the suite run inside the image, which holds tests/ but neither the Dockerfile nor the source
    pytest.skip("no Dockerfile and source tree here (not a checkout)", allow_module_level=True)

# `pip install ... ".[$(EXTRAS)]"` (Makefile) or `".[${EXTRAS}]"` (Dockerfile): the package from
# the current folder, its extras from one variable.
PIP_EXTRAS = re.compile(r"""\bpip install\b[^\n]*?(["'])\.\[\$[({](\w+)[)}]\]\1""")


@pytest.fixture(scope="module")
def dockerfile():
    return DockerfileParser(fileobj=io.BytesIO(DOCKERFILE.read_bytes()))  # it reads lazily


def instructions(dockerfile, *names):
    return [(i, s["instruction"], s["value"]) for i, s in enumerate(dockerfile.structure)
            if s["instruction"] in names]


def exec_form(value):
    """The argument list of a CMD / ENTRYPOINT, which must be JSON (exec form: no shell
    between docker and the program, so signals reach it)."""
    args = json.loads(value)
    assert isinstance(args, list) and all(isinstance(a, str) for a in args), value
    return args


def command(dockerfile):
    """ENTRYPOINT + CMD as the container runs them, from the last of each."""
    entry = instructions(dockerfile, "ENTRYPOINT")
    cmd = instructions(dockerfile, "CMD")
    assert cmd, "no CMD"
    return (exec_form(entry[-1][2]) if entry else []) + exec_form(cmd[-1][2])


def test_base_image_is_a_slim_python(dockerfile):
    froms = instructions(dockerfile, "FROM")
    assert len(froms) == 1, "one stage expected"
    assert re.fullmatch(r"python:3\.(1[0-9])(\.\d+)?-slim(-\w+)?", dockerfile.baseimage), dockerfile.baseimage


def test_runs_as_a_non_root_user_created_in_the_image(dockerfile):
    run_at = min(i for i, *_ in instructions(dockerfile, "CMD", "ENTRYPOINT"))
    users = [(i, v.strip()) for i, _, v in instructions(dockerfile, "USER") if i < run_at]
    assert users, "no USER before CMD / ENTRYPOINT: the container would run as root"
    user = users[-1][1].split(":")[0]
    assert user not in ("root", "0") and not user.startswith("$"), user
    assert not any(i > users[-1][0] for i, *_ in instructions(dockerfile, "USER")), "USER changes again later"
    created = [v for _, _, v in instructions(dockerfile, "RUN") if re.search(rf"\b(useradd|adduser)\b.*\b{user}\b", v)]
    assert created, f"user {user!r} is never created (useradd / adduser)"


def test_installs_the_package_with_extras_as_the_makefile_does(dockerfile):
    makefile = PIP_EXTRAS.search((ROOT / "Makefile").read_text())
    assert makefile, "the Makefile has no `pip install ... \".[$(EXTRAS)]\"` line"
    runs = [(i, v) for i, _, v in instructions(dockerfile, "RUN") if "pip install" in v]
    installs = [(i, m) for i, m in ((i, PIP_EXTRAS.search(v)) for i, v in runs) if m]
    assert len(installs) == 1, f"expected one `pip install ... \".[${{EXTRAS}}]\"`, got {runs}"
    at, match = installs[0]
    assert match.group(2) == makefile.group(2) == "EXTRAS"
    # the build argument that picks them, declared before the install; by default the GPU image
    declared = [i for i, _, v in instructions(dockerfile, "ARG") if v.split("=")[0].strip() == "EXTRAS"]
    assert declared and declared[0] < at, "no ARG EXTRAS before the install"
    assert {"cli", "cuda13"} <= set(dockerfile.args["EXTRAS"].split(",")), dockerfile.args


def test_every_copy_source_exists_and_is_not_dockerignored(dockerfile):
    ignored = set()
    if (ROOT / ".dockerignore").is_file():
        ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
                   if line.strip() and not line.startswith("#")}
    copies = instructions(dockerfile, "COPY", "ADD")
    assert copies
    for _, name, value in copies:
        args = [a for a in shlex.split(value) if not a.startswith("--")]
        assert not any(a.startswith("--from") for a in shlex.split(value)), "no multi-stage copies expected"
        *sources, _dest = args
        assert sources, f"{name} {value}: no source"
        for source in sources:
            assert not re.match(r"[a-z]+://", source), f"{name} {source}: fetches from the network"
            matched = list(ROOT.glob(source))
            assert matched, f"{name} {source}: no such file or folder in the repository"
            top = Path(source).parts[0]
            assert top not in ignored, f"{name} {source}: excluded by .dockerignore"


def test_the_image_holds_what_the_test_command_needs(dockerfile):
    sources = {a for _, _, v in instructions(dockerfile, "COPY") for a in shlex.split(v)[:-1]}
    assert {"tests", "bench", "pyproject.toml", "gpubackprop", "kernels"} <= sources
    text = DOCKERFILE.read_text()
    assert re.search(r"--build-arg EXTRAS=\S*\btest\b", text), "the test image's build is not documented"
    assert "python -m pytest" in text and "--gpus all" in text


def test_default_command_is_the_demo_on_device_auto(dockerfile):
    args = command(dockerfile)
    assert args[:2] == ["gpubackprop", "train"], args
    assert args[args.index("--dataset") + 1] == "digits"
    assert args[args.index("--device") + 1] == "auto"

    # the same run as `make demo`, apart from where it writes
    demo = re.search(r"^demo:.*\n\t\$\(BIN\)/(gpubackprop train .*)$", (ROOT / "Makefile").read_text(), re.M)
    assert demo, "no demo target in the Makefile"
    make_args = shlex.split(demo.group(1))

    def without_out(a):
        return a[: a.index("--out")] + a[a.index("--out") + 2:] if "--out" in a else a

    assert without_out(args) == without_out(make_args)

"""MLP: a Network (gpubackprop.nn.network) that trains, evaluates and saves itself.

The training itself is gpubackprop.train's: ``train_step`` and ``fit`` both run a
Trainer's step (forward, loss, backward, guard, clip, update); ``fit`` adds the
loop of gpubackprop.train.loop. Files are gpubackprop.modelfile's.
"""

import weakref

import numpy as np

from .. import distributed, export, modelfile, tabular
from ..train import recovery
from ..train.loop import FitSettings, check_validation_data, fit
from ..train.trainer import Trainer
from . import inputs
from .losses import HUBER_DELTA
from .network import Network


class MLP(Network):
    """A multilayer perceptron trained by backpropagation.

    sizes       layer widths, input first: [784, 256, 256, 10]
    activation  hidden activation: a name in gpubackprop.nn.activations.ACTIVATIONS
                (the table lists them with their g and g'); the output layer is linear
    loss        a name in gpubackprop.nn.losses.LOSSES (the table lists their maths):
                "cross_entropy" (softmax + mean negative log-likelihood; classes),
                "binary_cross_entropy" (a sigmoid per output; binary and multilabel
                targets), "mse", "huber" (with ``huber_delta``), "mae" (regression),
                "poisson" (counts; the output is the log of the mean count)
    device      "cpu", "cuda", "cuda:N" or "auto"
    dtype       "float32" or "float64"
    precision   "float32" (exact), "tf32" (float32 GEMMs on tensor cores), or mixed
                precision "bf16" / "fp16" (16-bit activations and GEMMs, float32
                master weights; fp16 with dynamic loss scaling): see gpubackprop.optim.precision
    seed        makes initialisation, shuffling and dropout reproducible
    dropout     the rate p at which hidden activations are dropped in training
                (inverted dropout; see gpubackprop.nn.dropout)
    huber_delta huber's threshold between its squared and absolute parts (default 1)

    Weights start He-normal (std sqrt(2 / n_in)) for the ReLU family and
    Glorot-uniform (limit sqrt(6 / (n_in + n_out))) otherwise; biases at zero.

    ``model.inputs`` and ``model.target`` (gpubackprop.tabular; None by default, set
    by the CLI or by the user) make the model a whole predictor of raw rows: where
    set, ``fit``, ``evaluate``, ``predict`` and ``predict_proba`` take the rows a
    user holds (a DataFrame, or an array of the raw columns) through ``inputs``, and
    labels in the original classes or units through ``target``; ``save`` keeps both.
    """

    def __init__(self, sizes, activation="relu", loss="cross_entropy", device="cpu", dtype="float32", seed=None,
                 precision="float32", dropout=0.0, huber_delta=HUBER_DELTA):
        super().__init__(sizes, activation, loss, device, dtype, seed, precision, dropout, huber_delta)
        self.stop_training = False  # a callback sets it to end fit after the epoch
        self.optimizer = None  # the last fit's
        self.comm = distributed.SingleProcess()  # the running fit's communicator (callbacks read its rank)
        self._step_trainer = None  # train_step's, kept so that its captured steps are too
        self.inputs = None  # a tabular.Inputs: raw rows -> features
        self.target = None  # a tabular.Target: labels <-> what the network learns

    def loss_and_grad(self, X, y, sample_weight=None):
        """(loss, gradients under state_dict's names): one forward and backward pass, no update."""
        with self.context():
            ws = self.load_batch(X, y, sample_weight)
            self.forward_pass(ws)
            loss = float(self.compute_loss(ws))
            self.backward_pass(ws)
            if self.scaler is not None:  # fp16: the gradients of the loss, not of S times it
                self.scaler.unscale_and_check(self.grads)
                self.scaler.found_inf.fill(0)
            return loss, self.grad_dict()

    def train_step(self, X, y, optimizer, clip_norm=None, on_nonfinite="raise", sample_weight=None):
        """One step of ``fit`` on the batch (X, y) (weighted by ``sample_weight``): forward, backward, the divergence guard,
        clipping at ``clip_norm``, the update; returns the loss. A step whose gradients
        hold Inf or NaN is skipped; then ``on_nonfinite`` "raise" (FloatingPointError
        naming the tensors) or "skip" (a warning), as in fit."""
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"train_step's on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r} "
                             "('restore' needs fit's checkpoints)")
        with self.context():
            ws = self.load_batch(X, y, sample_weight)
            trainer = self._trainer(optimizer, clip_norm)
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # the guard speaks instead (fit's)
                loss = float(trainer.step(ws))
            optimizer.sync_steps()  # fp16 or the guard may have skipped the step
            recovery.apply_policy(trainer, on_nonfinite)
            return loss

    def _trainer(self, optimizer, clip_norm):
        t = self._step_trainer
        if t is None or t.optimizer is not optimizer or t.clip_norm != clip_norm:
            # Through a weak proxy: the model keeps its trainer, and a trainer that
            # held the model would make a cycle, keeping device memory until the
            # garbage collector happened to run.
            t = self._step_trainer = Trainer(weakref.proxy(self), optimizer, clip_norm)
        return t

    def to(self, device):
        self._step_trainer = None  # its buffers were on the old device
        return super().to(device)

    def fit(self, X, y, epochs=10, batch_size=32, optimizer=None, **settings):
        """Mini-batch training, reshuffled every epoch; returns the history.

        Settings (gpubackprop.train.loop.FitSettings): epochs=10, batch_size=32,
        optimizer=None, shuffle=True, validation_data=None, progress=True,
        callbacks=None, graphs=True, clip_norm=None, checkpoint_dir=None,
        checkpoint_every=None, keep_checkpoints=3, resume=False,
        on_nonfinite="raise", comm=None, sample_weight=None, class_weight=None.

        ``sample_weight`` (one weight >= 0 per row) makes every batch's loss the
        weighted mean of its rows' losses, as scikit-learn defines it (a row of
        weight 0 counts as if it were not there); ``class_weight`` ("balanced", or a
        dict {label: weight} over the labels y holds) multiplies each row's weight
        by its class's, for cross entropy. ``validation_data`` may carry weights
        too: (X_val, y_val, sample_weight_val). The history's metrics are then
        weighted means as well.

        The history is a dict of per-epoch lists: "loss" and the loss's metric
        ("accuracy" for cross entropy, "binary_accuracy" for binary cross entropy,
        "mse" / "mae" for those losses, none for huber and poisson), averaged over the
        epoch's batches as they were trained, and the same with "val_" before them
        when ``validation_data`` is given.
        The optimizer defaults to Adam(lr=1e-3) and stays as ``model.optimizer``.
        ``callbacks`` are gpubackprop.train.callbacks objects (or any with some of their
        hooks); ``progress`` adds a ProgressBar. ``clip_norm`` rescales the
        gradients whenever their global L2 norm exceeds it (torch's clip_grad_norm_).

        ``checkpoint_dir`` saves a checkpoint at the end of every epoch, or every N
        steps with ``checkpoint_every=N`` (keeping the newest ``keep_checkpoints``);
        ``resume=True`` continues from the newest sound one there, to the same
        result, bit for bit on the CPU, as a run never interrupted (see
        gpubackprop.train.checkpoint; with the same sample weights, else it refuses),
        and warns where it finds none.

        A step whose gradients hold Inf or NaN is skipped on the device; then
        ``on_nonfinite`` "raise" (FloatingPointError naming the step and tensors),
        "skip" (warn and go on) or "restore" (the newest checkpoint, half the
        learning rate): see gpubackprop.train.recovery. The model never holds NaN.

        Where the backend captures graphs (CUDA), the second step on the same
        buffers (a batch size's workspace, the optimizer's state, the data) is
        captured whole (gathering the batch, forward, loss, backward, update) and
        every later one is a graph launch; new buffers (a workspace made again
        after others pushed it out) are captured anew. ``graphs=False`` runs every
        step op by op instead (for debugging: the numbers are the same).

        ``comm`` (from ``gpubackprop.distributed.init()``) trains data parallel: each
        of its ranks passes the whole data set, trains on its shard of every global
        batch of ``batch_size`` rows, and the model ends equal on all ranks and to
        one process's (see gpubackprop.distributed). Rank 0 alone shows progress
        and writes checkpoints; an error on any rank aborts the job.
        """
        settings.update(epochs=epochs, batch_size=batch_size, optimizer=optimizer)
        if settings.get("validation_data") is not None:
            X_val, y_val, *w_val = check_validation_data(settings["validation_data"])
            settings["validation_data"] = (*self.encoded(X_val, y_val), *w_val)
        if settings.get("class_weight") is not None:
            settings["sample_weight"] = self.row_weights(y, settings.get("sample_weight"), settings["class_weight"])
            settings["class_weight"] = None
        return fit(self, *self.encoded(X, y), FitSettings.of(settings))

    fit.__signature__ = FitSettings.signature(fit)  # help(MLP.fit) lists every setting

    def evaluate(self, X, y, sample_weight=None):
        """The loss and its metric over all of X (``Network.metrics``: {"loss",
        "accuracy"} for cross entropy, {"loss", "mse"} for mse, ...), weighted means
        with ``sample_weight``; with a regression ``target``, in its standardized units."""
        with self.context():
            X, T = self.prepare(*self.encoded(X, y))
            return self.evaluation(X, T, self.prepare_weights(sample_weight, X.shape[0]))

    def row_weights(self, y, sample_weight, class_weight):
        """sample_weight (or ones) times each row's class weight (inputs.class_weights),
        for cross entropy or one logistic unit of a two-class target."""
        if self.criterion.targets != "classes" and not self.binary_unit:
            raise ValueError(f"class_weight weighs classes, for cross_entropy; this model's loss is {self.loss}: "
                             "pass sample_weight instead")
        weights = inputs.class_weights(y, class_weight)
        if sample_weight is None:
            return weights
        with self.context():  # checked as fit checks weights, before they meet the class weights
            return weights * self.backend.to_host(self.prepare_weights(sample_weight, len(weights)))

    def encoded(self, X, y):
        """(X, y) through ``inputs`` and ``target`` where the model has them."""
        return (X if self.inputs is None else self.inputs.transform(X),
                y if self.target is None else self.target.encode(y))

    @property
    def binary_unit(self):
        """Whether the model is one logistic unit (binary_cross_entropy, one output) for
        a two-class ``target``: its 0 / 1 output is the class id."""
        return (self.target is not None and self.target.task == "classification"
                and self.criterion.output == "sigmoid" and self.sizes[-1] == 1)

    def predict(self, X):
        """What Network.predict gives for the rows of X (labels, 0 / 1 per output, mean
        counts or outputs): the original labels or units where the model has a ``target``."""
        out = super().predict(X if self.inputs is None else self.inputs.transform(X))
        if self.target is None:
            return out
        out = self.backend.to_host(out)
        return self.target.decode(out[:, 0] if self.binary_unit else out)

    def predict_proba(self, X):
        """Class probabilities, (n, classes): softmax, or a sigmoid per output for
        binary_cross_entropy; columns in the order of ``model.target.classes`` where the
        model has a target (for one logistic unit, both classes': 1 - p and p)."""
        proba = super().predict_proba(X if self.inputs is None else self.inputs.transform(X))
        if not self.binary_unit:
            return proba
        p = self.backend.to_host(proba)[:, 0]
        return np.stack([1 - p, p], axis=1)

    def summary(self, print_fn=print):
        """Print the layers as Keras' ``model.summary()`` does: each dense layer's output
        shape, activation and parameter count, the totals, and where and how it computes."""
        rows = [("layer", "output shape", "activation", "parameters")]
        for l in range(1, len(self.sizes)):
            last = l == len(self.sizes) - 1
            act = {"softmax": "linear (softmax in the loss)", "sigmoid": "linear (sigmoid in the loss)",
                   "exp": "linear (log of the mean)"}.get(self.criterion.output, "linear") if last else self.activation
            rows.append((f"dense_{l}", f"(batch, {self.sizes[l]})", act,
                         f"{self.sizes[l - 1] * self.sizes[l] + self.sizes[l]:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]

        def line(row):  # text columns left-aligned, the count right-aligned
            return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

        rule = "-" * len(line(rows[0]))
        nbytes = self.n_params * np.dtype(self.dtype).itemsize
        text = [f"{type(self).__name__}: input (batch, {self.sizes[0]}), loss {self.loss}", rule, line(rows[0]), rule,
                *map(line, rows[1:]), rule,
                f"parameters: {self.n_params:,} ({nbytes:,} bytes); device {self.device}, dtype {self.dtype}, "
                f"precision {self.precision}" + (f", dropout {self.dropout}" if self.dropout else "")]
        if self.inputs is not None:
            text.append(f"inputs: {len(self.inputs.columns)} columns ({', '.join(self.inputs.names[:8])}"
                        f"{', ...' if len(self.inputs.columns) > 8 else ''}), scaling {self.inputs.scale}")
        if self.target is not None:
            text.append(f"target: {self.target.task}" + (f", classes {self.target.classes}"
                                                          if self.target.task == "classification" else ""))
        print_fn("\n".join(text))

    def to_onnx(self, path=None, opset=None):
        """The model as an ONNX graph (its input transform and target scaling folded in;
        outputs ``label`` and ``probabilities``, or ``variable``), written to ``path``
        where given: see gpubackprop.export. Needs the onnx extra."""
        return export.to_onnx(self, path, opset)

    # ---- files -----------------------------------------------------------------------
    def save(self, path, optimizer=None, metadata=None):
        """Write a safetensors file (atomically): parameters, config, optionally the
        optimizer's state and the caller's JSON ``metadata``; see gpubackprop.modelfile."""
        modelfile.write(path, self.config(), self.state_dict(), optimizer, metadata,
                        None if self.inputs is None else self.inputs.to_json(),
                        None if self.target is None else self.target.to_json())

    @classmethod
    def load(cls, path, device="cpu"):
        """The model saved at ``path``, on ``device``, with its input transform and
        target encoding (from a CLI-trained file of the first format: its scaling)."""
        saved = modelfile.read(path)
        model = cls(**saved.config, device=device)
        model.load_state_dict(saved.tensors)
        if saved.inputs is not None:
            model.inputs = tabular.Inputs.from_json(saved.inputs)
        else:
            model.inputs = tabular.Inputs.from_legacy(saved.user, model.sizes[0])
        if saved.target is not None:
            model.target = tabular.Target.from_json(saved.target)
        else:
            model.target = tabular.Target.from_legacy(saved.user, saved.config)
        return model


def load(path, device="cpu"):
    """The MLP saved at ``path`` (by ``model.save``), on ``device``."""
    return MLP.load(path, device)

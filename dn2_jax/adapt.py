"""Feature adaptation before DN2: PANDA and Mean-Shifted Contrastive (MSC) fine-tuning with optax.

DN2's authors went on to adapt the pretrained features to the normal images and score with the same kNN:

- **PANDA** (Reiss, Cohen, Bergman & Hoshen, 2021): compactness loss ‖F(x) − c‖² towards the mean pretrained
  feature c of the normal images. Against collapse (every image mapped to c): a weight anchor to the
  pretrained weights θ₀ and early stopping. The paper's anchor is EWC with the diagonal Fisher information of
  the ImageNet classifier; ImageNet is not available offline, so it cannot be computed here. `anchor="l2sp"`
  (the default) uses λ‖θ − θ₀‖² (L2-SP); `anchor="ewc"` takes a Fisher diagonal you computed elsewhere
  (`fisher=`, a tree shaped like the parameters) and uses λ Σ F (θ − θ₀)².
- **MSC** (Reiss & Hoshen, 2023): features z = F(x)/‖F(x)‖ of two augmented views are shifted by the normal
  mean c (z̃ = (z − c)/‖z − c‖) and trained with a contrastive (NT-Xent) loss at temperature τ, plus an angular
  centre loss mean(1 − z·ĉ) that pulls normal features towards the centre direction.

Everything here is pure: `train_step(state, images, rng)` maps a `TrainState` (params, batch_stats, opt_state,
step) and a uint8 batch to a new state and the loss, jitted and data-parallel over a 1-D device mesh (the batch
is sharded, the state replicated; BatchNorm statistics of the "batch" policy are computed over the global
batch, so N devices give the update of one). `adapt()` runs the epochs, checkpoints after each one (resumable
after a kill, bit-identical on CPU for the same seed) and returns the adapted variables; `save_adapted` writes
them as a weights directory that every `weights=` argument accepts, fingerprinted like any other weights, so a
store embedded with adapted weights never mixes with one from the pretrained weights.

BatchNorm policy (`bn`): "batch" normalises with batch statistics and updates the running averages (PyTorch's
`model.train()`, as the papers' code does); "frozen" keeps the pretrained running statistics and runs BatchNorm
in inference mode (its scale and bias train with the other unfrozen parameters), so single-class batches cannot
shift them. Defaults: PANDA "batch" with lr 1e-4, MSC "frozen" with lr 1e-5 (the paper's). PANDA's paper rate
1e-2 is for ResNet: on EfficientNet-Lite0 under "frozen" BatchNorm (whose depthwise layers have tiny running
variances) the compactness loss collapses the features to a point within one epoch at lr 1e-2 to 1e-4 and
shrinks their spread to a quarter in 8 steps even at 1e-6; under "batch", lr 1e-3 loses 5-6 points of
validation ROC-AUC in one epoch and 1e-4 gains a little (scripts/study_adapt.py, README).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from dn2_jax import models
from dn2_jax.convert import restore_variables, save_variables
from dn2_jax.errors import DN2Error, DN2FileError
from dn2_jax.preprocessing import Preset, check_images, preprocess
from dn2_jax.sharding import DATA_AXIS, data_mesh

METHODS = ("panda", "msc")
ANCHORS = ("l2sp", "ewc", "none")
BN_POLICIES = ("frozen", "batch")
SCHEDULES = ("constant", "cosine")
SPREAD_PROBE = 512  # normal images whose feature spread is tracked per epoch (collapse monitor)


def _field(default: Any, help: str, **extra: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **extra})


@dataclasses.dataclass(frozen=True)
class AdaptConfig:
    """Settings of one adaptation run (plain data, saved with the adapted weights; `dn2 adapt` flags).

    Defaults follow the papers where they apply to this setting: SGD with momentum 0.9 and weight decay 5e-5;
    MSC lr 1e-5 with τ = 0.25; the stem and the first two stages frozen. PANDA's lr (1e-4) and BatchNorm policy
    (batch statistics) were chosen on a validation split carved from train (module docstring).
    """

    method: str = _field("panda", "panda (compactness + anchor) or msc (mean-shifted contrastive)", choices=METHODS)
    epochs: int = _field(10, "passes over the normal images")
    batch_size: int = _field(32, "images per training step (a multiple of the device count)")
    learning_rate: float | None = _field(None, "SGD learning rate (default: 1e-4 PANDA, 1e-5 MSC)")
    momentum: float = _field(0.9, "SGD momentum")
    weight_decay: float = _field(5e-5, "SGD weight decay")
    schedule: str = _field("constant", "learning-rate schedule", choices=SCHEDULES)
    anchor: str = _field("l2sp", "PANDA's collapse guard: l2sp (λ‖θ−θ₀‖²), ewc (needs a Fisher diagonal; API "
                         "only) or none", choices=ANCHORS)
    anchor_weight: float = _field(1e-3, "λ of the anchor")
    bn: str | None = _field(None, "BatchNorm: batch statistics (updated), or frozen running statistics "
                            "(default: batch for PANDA, frozen for MSC)", choices=BN_POLICIES)
    freeze: tuple[str, ...] | None = _field(None, "module-name prefixes kept fixed (default: stem + first two "
                                            "stages)")
    temperature: float = _field(0.25, "MSC contrastive temperature τ")
    angular_weight: float = _field(1.0, "MSC angular centre-loss weight")
    early_stop: float | None = _field(None, "stop when the normal features' spread falls below this fraction of "
                                      "the pretrained spread (collapse guard)")
    seed: int = _field(0, "seed of the data order and the augmentations")

    def __post_init__(self):
        if self.method not in METHODS:
            raise DN2Error(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.bn is None:  # the method's default, recorded resolved
            object.__setattr__(self, "bn", "batch" if self.method == "panda" else "frozen")
        if not isinstance(self.epochs, int) or self.epochs <= 0:
            raise DN2Error(f"epochs must be a positive integer, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 2:
            raise DN2Error(f"batch_size must be an integer ≥ 2, got {self.batch_size!r}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise DN2Error(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.momentum < 1:
            raise DN2Error(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0 or self.anchor_weight < 0:
            raise DN2Error("weight_decay and anchor_weight must be ≥ 0")
        for name, value, allowed in (("schedule", self.schedule, SCHEDULES), ("anchor", self.anchor, ANCHORS),
                                     ("bn", self.bn, BN_POLICIES)):
            if value not in allowed:
                raise DN2Error(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if not self.temperature > 0:
            raise DN2Error(f"temperature must be positive, got {self.temperature}")
        if self.early_stop is not None and not 0 < self.early_stop < 1:
            raise DN2Error(f"early_stop must be in (0, 1), got {self.early_stop}")

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-4 if self.method == "panda" else 1e-5

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["freeze"] = None if self.freeze is None else list(self.freeze)
        return d


@flax.struct.dataclass
class TrainState:
    """The whole training state, a pytree: `step` (int32 scalar), `params`, `batch_stats`, `opt_state`."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


# ----------------------------------------------------------------------------------------------- losses


def panda_loss(features: jax.Array, centre: jax.Array) -> jax.Array:
    """Compactness loss: mean over the batch of ‖f − c‖². features (B, D), centre (D,) → scalar."""
    return jnp.mean(jnp.sum(jnp.square(features - centre), axis=-1))


def _unit(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def msc_loss(view1: jax.Array, view2: jax.Array, centre: jax.Array, *, temperature: float = 0.25,
             angular_weight: float = 1.0) -> jax.Array:
    """Mean-Shifted contrastive loss of two views' raw features (B, D) each; `centre` (D,) is the mean of the
    L2-normalised pretrained features of the normal images. NT-Xent over the 2B mean-shifted unit features
    (each view's positive is the other view of the same image) + `angular_weight` · mean(1 − ẑ·ĉ)."""
    z1, z2 = _unit(view1), _unit(view2)
    c = _unit(centre)
    s = _unit(jnp.concatenate([z1 - centre, z2 - centre]))
    n = z1.shape[0]
    logits = s @ s.T / temperature
    logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits)
    positives = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
    contrastive = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, positives))
    angular = 1.0 - jnp.mean(jnp.concatenate([z1, z2]) @ c)
    return contrastive + angular_weight * angular


def anchor_penalty(params: Any, anchor: Any, weight: float, fisher: Any | None = None) -> jax.Array:
    """λ Σ (θ − θ₀)² (L2-SP), or λ Σ F (θ − θ₀)² with a Fisher diagonal `fisher` shaped like `params` (EWC)."""
    if fisher is None:
        terms = jax.tree.map(lambda p, a: jnp.sum(jnp.square(p - a)), params, anchor)
    else:
        terms = jax.tree.map(lambda p, a, f: jnp.sum(f * jnp.square(p - a)), params, anchor, fisher)
    return weight * sum(jax.tree.leaves(terms))


# ----------------------------------------------------------------------------------------- augmentation


def _resized_crop(image: jax.Array, key: jax.Array, scale: tuple[float, float], ratio: tuple[float, float]):
    h, w = image.shape[0], image.shape[1]
    k1, k2, k3, k4 = jax.random.split(key, 4)
    area = jax.random.uniform(k1, (), minval=scale[0], maxval=scale[1])
    log_r = jax.random.uniform(k2, (), minval=math.log(ratio[0]), maxval=math.log(ratio[1]))
    r = jnp.exp(log_r)
    cw = jnp.clip(jnp.sqrt(area * r) * w, 1.0, w)
    ch = jnp.clip(jnp.sqrt(area / r) * h, 1.0, h)
    top = jax.random.uniform(k3, ()) * (h - ch)
    left = jax.random.uniform(k4, ()) * (w - cw)
    sy, sx = h / ch, w / cw
    return jax.image.scale_and_translate(image, image.shape, (0, 1), jnp.stack([sy, sx]),
                                         jnp.stack([-top * sy, -left * sx]), method="linear", antialias=True)


def augment(images: jax.Array, key: jax.Array, *, scale: tuple[float, float] = (0.2, 1.0),
            jitter: float = 0.4, jitter_prob: float = 0.8, gray_prob: float = 0.2) -> jax.Array:
    """MSC's augmentations on device, seeded by `key`: random resized crop (area `scale`, aspect 3/4..4/3,
    back to the input size), horizontal flip, colour jitter (brightness, contrast, saturation each by a factor
    in [1 − jitter, 1 + jitter], applied with probability `jitter_prob`), grayscale with probability
    `gray_prob`. images: float (B, H, W, 3) in 0..255 → same shape, clipped to 0..255. Jit-able."""
    b = images.shape[0]
    keys = jax.random.split(key, 7)
    x = jax.vmap(functools.partial(_resized_crop, scale=scale, ratio=(3 / 4, 4 / 3)))(
        images, jax.random.split(keys[0], b))
    flip = jax.random.bernoulli(keys[1], 0.5, (b, 1, 1, 1))
    x = jnp.where(flip, x[:, :, ::-1], x)
    weights = jnp.asarray([0.299, 0.587, 0.114], x.dtype)

    def factors(k):
        return jax.random.uniform(k, (b, 1, 1, 1), minval=1 - jitter, maxval=1 + jitter)

    on = jax.random.bernoulli(keys[2], jitter_prob, (b, 1, 1, 1))
    y = x * factors(keys[3])
    mean = jnp.mean(y @ weights, axis=(1, 2))[:, None, None, None]
    y = (y - mean) * factors(keys[4]) + mean
    gray = (y @ weights)[..., None]
    y = gray + (y - gray) * factors(keys[5])
    x = jnp.clip(jnp.where(on, y, x), 0.0, 255.0)
    to_gray = jax.random.bernoulli(keys[6], gray_prob, (b, 1, 1, 1))
    return jnp.where(to_gray, jnp.broadcast_to((x @ weights)[..., None], x.shape), x)


# ------------------------------------------------------------------------------------------ train step


def default_freeze(params: Any) -> tuple[str, ...]:
    """Module-name prefixes of the stem and the first two stages (what PANDA and MSC keep fixed on ResNet:
    conv1, bn1, layer1, layer2), plus the classifier 'fc' (unused by the DN2 feature)."""
    names = set(params)
    if "layer1_0" in names:  # ResNet
        return ("conv1", "bn1", "layer1_", "layer2_", "fc")
    if "conv_stem" in names:  # EfficientNet-Lite: stage 1 has 1 block, stage 2 has 2 at every depth here
        return ("conv_stem", "bn0", "blocks_0", "blocks_1", "blocks_2", "fc")
    return ()


def _frozen(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or (p.endswith("_") and name.startswith(p)) for p in prefixes)


def trainable_mask(params: Any, freeze: Sequence[str]) -> Any:
    """Tree of bools like `params`: False under a top-level module named by `freeze` (an exact name, or a
    prefix ending in '_' such as 'layer1_')."""
    out = {}
    for name, sub in params.items():
        keep = not _frozen(name, freeze)
        out[name] = jax.tree.map(lambda _, keep=keep: keep, sub)
    return out


def make_optimizer(cfg: AdaptConfig, mask: Any, steps: int) -> optax.GradientTransformation:
    """SGD with momentum and decoupled-into-gradient weight decay (PyTorch's SGD), on the trainable leaves only."""
    lr = cfg.lr if cfg.schedule == "constant" else optax.cosine_decay_schedule(cfg.lr, max(steps, 1))
    sgd = optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.sgd(lr, momentum=cfg.momentum or None))
    labels = jax.tree.map(lambda keep: "train" if keep else "freeze", mask)
    return optax.multi_transform({"train": sgd, "freeze": optax.set_to_zero()}, labels)


def _features(module: Any, params: Any, batch_stats: Any, x: jax.Array, update_stats: bool):
    """Pooled features, in float32 or wider (float64 parameters under x64 stay float64: gradient checks)."""
    variables = {"params": params, "batch_stats": batch_stats}
    if update_stats:
        out, stats = module.apply(variables, x, mutable=["batch_stats"])
        out, stats = out["pooled"], stats["batch_stats"]
    else:
        out, stats = module.apply(variables, x)["pooled"], batch_stats
    return out.astype(jnp.promote_types(out.dtype, jnp.float32)), stats


def loss_fn(params: Any, batch_stats: Any, images: jax.Array, key: jax.Array, *, module: Any, preset: Preset,
            cfg: AdaptConfig, centre: jax.Array, anchor: Any, fisher: Any | None):
    """(loss, new batch_stats) of one uint8 batch (B, H, W[, C]). Pure; `module` built with train=(bn == 'batch').

    The anchor term runs over every parameter: frozen ones never move, so they add nothing."""
    x = preprocess(images, preset)
    update = cfg.bn == "batch"
    if cfg.method == "panda":
        f, stats = _features(module, params, batch_stats, x, update)
        loss = panda_loss(f, centre)
    else:
        mean, std = jnp.asarray(preset.mean), jnp.asarray(preset.std)
        pixels = x * std + mean
        k1, k2 = jax.random.split(key)
        views = jnp.concatenate([augment(pixels, k1), augment(pixels, k2)])
        f, stats = _features(module, params, batch_stats, (views - mean) / std, update)
        n = images.shape[0]
        loss = msc_loss(f[:n], f[n:], centre, temperature=cfg.temperature, angular_weight=cfg.angular_weight)
    if cfg.anchor != "none" and cfg.anchor_weight > 0:
        loss = loss + anchor_penalty(params, anchor, cfg.anchor_weight, fisher if cfg.anchor == "ewc" else None)
    return loss, stats


def train_step(state: TrainState, images: jax.Array, key: jax.Array, consts: tuple[jax.Array, Any, Any], *,
               tx: optax.GradientTransformation, module: Any, preset: Preset,
               cfg: AdaptConfig) -> tuple[TrainState, jax.Array]:
    """One SGD step: pure function of (state, uint8 batch, PRNG key, (centre, anchor params, fisher or None))
    → (new state, loss). `tx`, `module`, `preset`, `cfg` are static."""
    centre, anchor, fisher = consts
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, images, key, module=module, preset=preset, cfg=cfg, centre=centre,
        anchor=anchor, fisher=fisher)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, stats, opt_state), loss


# ------------------------------------------------------------------------------------------ the loop


def pooled_features_fn(module: Any, preset: Preset, mesh, batch_size: int):
    """`run(params, batch_stats, images) -> (N, D)`: one jitted forward pass for any variables of `module`
    (compiled once, not once per epoch), in batches of `batch_size` sharded over `mesh`."""
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))

    @functools.partial(jax.jit, in_shardings=(replicated, replicated, sharded), out_shardings=sharded)
    def pooled(params, batch_stats, images):
        return module.apply({"params": params, "batch_stats": batch_stats}, preprocess(images, preset))["pooled"]

    def run(params, batch_stats, images: np.ndarray) -> np.ndarray:
        """Pooled float32 features (N, D) of uint8 images (N, H, W[, C]) under the given variables."""
        out = []
        for s in range(0, len(images), batch_size):
            batch = images[s : s + batch_size]
            n = len(batch)
            if n < batch_size:
                batch = np.concatenate([batch, np.zeros((batch_size - n,) + batch.shape[1:], batch.dtype)])
            out.append(np.asarray(pooled(params, batch_stats, jax.device_put(batch, sharded)))[:n])
        return np.concatenate(out).astype(np.float32)

    return run


def _spread(features: np.ndarray) -> float:
    """Mean squared distance of the features to their mean (feature units²): 0 when collapsed to a point."""
    return float(np.mean(np.sum(np.square(features - features.mean(0)), axis=1)))


def _checkpoint_leaves(state: TrainState) -> dict[str, np.ndarray]:
    return {f"{i:05d}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(jax.device_get(state)))}


def _restore_checkpoint(path: Path, template: TrainState, cfg: AdaptConfig, base: str):
    tree, meta = restore_variables(path)
    if meta.get("kind") != "dn2-adapt-checkpoint":
        raise DN2FileError(f"checkpoint_dir: {path} is not an adaptation checkpoint")
    if meta.get("config") != cfg.to_dict() or meta.get("base_fingerprint") != base:
        raise DN2Error(f"checkpoint_dir: {path} belongs to another run (other settings or base weights); "
                       "use a new checkpoint_dir or delete it")
    leaves, treedef = jax.tree.flatten(template)
    saved = [tree[k] for k in sorted(tree)]
    if len(saved) != len(leaves) or any(np.shape(a) != np.shape(b) for a, b in zip(saved, leaves, strict=True)):
        raise DN2FileError(f"checkpoint_dir: {path} does not match this model's training state")
    state = jax.tree.unflatten(treedef, [np.asarray(a, dtype=np.asarray(b).dtype)
                                         for a, b in zip(saved, leaves, strict=True)])
    return state, int(meta["epoch"]), list(meta["history"])


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(p): tuple(np.shape(v)) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_variables(module: Any, variables: Any, preset: Preset, what: str) -> None:
    """DN2Error unless `variables` has exactly the leaves and shapes `module` expects (e.g. other weights)."""
    probe = jax.ShapeDtypeStruct((1, preset.crop, preset.crop, 3), jnp.float32)
    want = jax.eval_shape(module.init, jax.random.key(0), probe)
    expected, got = _shapes(want), _shapes({k: variables.get(k, {}) for k in want})
    if expected != got:
        diff = sorted(set(expected.items()) ^ set(got.items()))[:3]
        raise DN2Error(f"{what} do not fit this backbone (first differences: {diff}); weights of another backbone?")


def adapt(images: np.ndarray, spec: models.BackboneSpec | str, variables: Any, cfg: AdaptConfig | None = None, *,
          fisher: Any | None = None, input_size: int | None = None, checkpoint_dir: str | os.PathLike | None = None,
          mesh=None, progress: bool = True, on_epoch: Callable[[int, Any], dict | None] | None = None,
          module: Any | None = None, preset: Preset | None = None) -> tuple[Any, list[dict]]:
    """Adapt `variables` of backbone `spec` to the normal images; returns (adapted variables, history).

    images: uint8 (N, H, W[, C]) normal training images (N ≥ batch_size). cfg: `AdaptConfig`. fisher: the EWC
    Fisher diagonal (a tree like variables['params']), needed iff cfg.anchor == 'ewc'. checkpoint_dir: the
    training state is saved there after every epoch and a rerun with the same settings resumes from it.
    on_epoch(epoch, variables) may return metrics (e.g. a test ROC-AUC) recorded in the history; it never
    steers training. history: one dict per epoch with 'epoch', 'loss' (mean over the epoch's steps), 'spread'
    (feature spread of the normal images relative to the pretrained one) and on_epoch's metrics.
    `module` / `preset` override the backbone's (for tests with small models).
    """
    cfg = cfg or AdaptConfig()
    if module is None and spec == "pixels":
        raise DN2Error("the pixels baseline has no weights to adapt; choose a network backbone")
    spec = None if module is not None else models.get_backbone(spec)
    images = np.asarray(images)
    check_images(images, "images")
    if len(images) < cfg.batch_size:
        raise DN2Error(f"batch_size={cfg.batch_size} is larger than the {len(images)} normal images")
    if cfg.anchor == "ewc" and fisher is None:
        raise DN2Error("anchor='ewc' needs fisher= (the Fisher diagonal, shaped like the parameters): ImageNet "
                       "Fisher information cannot be computed offline; use anchor='l2sp' otherwise")
    if "params" not in variables or "batch_stats" not in variables:
        raise DN2Error("variables must hold 'params' and 'batch_stats' (a BatchNorm backbone)")
    mesh = mesh or data_mesh(jax.local_devices())
    if cfg.batch_size % mesh.shape[DATA_AXIS]:
        raise DN2Error(f"batch_size={cfg.batch_size} must be a multiple of the {mesh.shape[DATA_AXIS]} devices")
    if preset is None:
        preset = spec.preset if input_size is None else spec.preset.at_size(input_size)
    eval_module = module if module is not None else spec.module(dtype=jnp.float32)
    train_module = eval_module.clone(train=True) if cfg.bn == "batch" else eval_module
    _check_variables(eval_module, variables, preset, "variables")
    params = jax.tree.map(jnp.asarray, variables["params"])
    batch_stats = jax.tree.map(jnp.asarray, variables["batch_stats"])
    base = models.fingerprint(variables)

    pooled = pooled_features_fn(eval_module, preset, mesh, cfg.batch_size)
    f0 = pooled(params, batch_stats, images)
    centre = f0.mean(0) if cfg.method == "panda" else np.asarray(_unit(jnp.asarray(f0))).mean(0)
    probe = np.sort(np.random.default_rng(cfg.seed).permutation(len(images))[:SPREAD_PROBE])
    spread0 = _spread(f0[probe])
    freeze = default_freeze(params) if cfg.freeze is None else cfg.freeze
    mask = trainable_mask(params, freeze)
    steps_per_epoch = len(images) // cfg.batch_size
    tx = make_optimizer(cfg, mask, cfg.epochs * steps_per_epoch)
    state = TrainState(jnp.zeros((), jnp.int32), params, batch_stats, tx.init(params))

    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
    step = jax.jit(functools.partial(train_step, tx=tx, module=train_module, preset=preset, cfg=cfg),
                   in_shardings=(replicated, sharded, replicated, replicated), out_shardings=(replicated, replicated))
    consts = jax.device_put((jnp.asarray(centre), params, fisher), replicated)

    start, history = 0, []
    ckpt = None if checkpoint_dir is None else Path(checkpoint_dir).absolute()
    if ckpt is not None and ckpt.is_dir() and any(ckpt.iterdir()):
        state, start, history = _restore_checkpoint(ckpt, state, cfg, base)
    state = jax.device_put(state, replicated)
    root = jax.random.key(cfg.seed)
    for epoch in range(start, cfg.epochs):
        order = np.random.default_rng((cfg.seed, epoch)).permutation(len(images))
        losses = []
        with tqdm(total=steps_per_epoch, desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}", unit="step",
                  disable=not progress, leave=False) as bar:
            for s in range(steps_per_epoch):
                batch = images[np.sort(order[s * cfg.batch_size : (s + 1) * cfg.batch_size])]
                key = jax.random.fold_in(root, epoch * steps_per_epoch + s)
                state, loss = step(state, jax.device_put(batch, sharded), key, consts)
                losses.append(float(loss))
                bar.set_postfix(loss=f"{losses[-1]:.4g}")
                bar.update()
        current = {"params": state.params, "batch_stats": state.batch_stats}
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)),
                  "spread": _spread(pooled(state.params, state.batch_stats, images[probe])) / spread0}
        if on_epoch is not None:
            record.update(on_epoch(epoch + 1, current) or {})
        history.append(record)
        if not np.isfinite(record["loss"]):
            raise DN2Error(f"adaptation diverged at epoch {epoch + 1} (loss {record['loss']}); lower learning_rate")
        if ckpt is not None:
            ckpt.parent.mkdir(parents=True, exist_ok=True)  # only once an epoch is done: bad input writes nothing
            save_variables(_checkpoint_leaves(state), ckpt, {
                "kind": "dn2-adapt-checkpoint", "epoch": epoch + 1, "history": history, "config": cfg.to_dict(),
                "base_fingerprint": base}, overwrite=True)
        if cfg.early_stop is not None and record["spread"] < cfg.early_stop:
            break
    adapted = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    adapted = jax.tree.map(np.asarray, adapted)
    return {**{k: v for k, v in variables.items() if k not in adapted}, **adapted}, history


def save_adapted(variables: Any, path: str | os.PathLike, *, backbone: str, base_variables: Any,
                 cfg: AdaptConfig, history: Sequence[dict], overwrite: bool = False) -> Path:
    """Write adapted variables as a weights directory (`load_variables(backbone, path)` reads it) recording
    the base weights' fingerprint, the settings and the history; published atomically."""
    meta = {"backbone": models.get_backbone(backbone).name, "source": "dn2 adapt",
            "adapted_from": models.fingerprint(base_variables), "adapt": cfg.to_dict(), "history": list(history),
            "fingerprint": models.fingerprint(variables)}
    return save_variables(variables, path, meta, overwrite=overwrite)


def adapt_to_weights(images: np.ndarray, backbone: str, out: str | os.PathLike, cfg: AdaptConfig | None = None, *,
                     weights: str | os.PathLike | None = None, input_size: int | None = None,
                     checkpoint_dir: str | os.PathLike | None = None, overwrite: bool = False,
                     on_epoch: Callable[[int, Any], dict | None] | None = None,
                     progress: bool = True) -> tuple[Path, list[dict]]:
    """What `dn2 adapt` does: adapt `backbone` (its default weights, or `weights`) to the normal `images` and
    write the adapted weights directory `out`; returns (absolute out, history).

    The output is checked before any work; the training state is checkpointed after every epoch in
    `checkpoint_dir` (default: a hidden sibling of `out`), so the same command resumes after a kill; the
    checkpoint is removed once `out` is published (atomically).
    """
    from dn2_jax.convert import load_variables
    from dn2_jax.fileio import check_writable

    cfg = cfg or AdaptConfig()
    if backbone == "pixels":
        raise DN2Error("the pixels baseline has no weights to adapt; choose a network backbone")
    out = check_writable(out, "dir", overwrite=overwrite, parents=True, what="--out")
    ckpt = Path(checkpoint_dir).absolute() if checkpoint_dir is not None else out.with_name(f".{out.name}.adapt-ckpt")
    base = load_variables(backbone, weights)
    adapted, history = adapt(images, backbone, base, cfg, input_size=input_size, checkpoint_dir=ckpt,
                             on_epoch=on_epoch, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = save_adapted(adapted, out, backbone=backbone, base_variables=base, cfg=cfg, history=history,
                        overwrite=overwrite)
    shutil.rmtree(ckpt, ignore_errors=True)
    return path, history


def plot_history(histories: dict[str, Sequence[dict]], path: str | os.PathLike) -> Path:
    """PNG of the loss and the ROC-AUC per epoch where recorded (else the feature spread), one line per run
    (e.g. per normal class); epoch 0 is the pretrained network. A falling ROC-AUC (or spread) while the loss
    still falls is collapse. Written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dn2_jax.fileio import atomic_write_bytes

    has_auc = any("auc" in r for hist in histories.values() for r in hist)
    key, label = ("auc", "test ROC-AUC (%) — reported, never steers") if has_auc else \
        ("spread", "feature spread / pretrained (collapse → 0)")
    fig, (ax_loss, ax_right) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for name, hist in histories.items():
        ax_loss.plot([r["epoch"] for r in hist if "loss" in r], [r["loss"] for r in hist if "loss" in r],
                     marker=".", label=name)
        points = [(r["epoch"], r[key] * (100 if has_auc else 1)) for r in hist if r.get(key) is not None]
        if points:
            ax_right.plot(*zip(*points, strict=True), marker=".", label=name)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax_right.set(xlabel="epoch (0 = pretrained)" if has_auc else "epoch", title=label)
    for ax in (ax_loss, ax_right):
        ax.grid(alpha=0.3)
    if 1 < len(histories) <= 12:
        ax_right.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())

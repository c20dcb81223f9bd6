"""The jackpot search step: learn scores over frozen params, then update the masks.

One jitted call runs forward, backward (to the scores only), the optax update and
the mask update, with the state donated. Nothing in ``frozen_params`` ever changes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jackpot_jax.core import adapters, sparsity, structured
from jackpot_jax.core.settings import SearchSettings

Metrics = dict[str, Any]


@flax.struct.dataclass
class SearchState:
    """Everything a search carries from step to step, as plain pytrees."""

    frozen_params: Any
    scores: dict[str, jax.Array]
    masks: dict[str, jax.Array]
    # The model's non-param state (the forward's ``statistics``): BatchNorm running
    # statistics in the launcher, any collections or NNX state through the API.
    statistics: Any
    opt_state: optax.OptState
    step: jax.Array
    # True where a weight's kept state has flipped at least once: a further flip of
    # such a weight is a flip-back (the mask oscillating rather than moving on).
    ever_flipped: dict[str, jax.Array]


def epoch_cosine(base: float, epochs: int, steps_per_epoch: int) -> optax.Schedule:
    """``base * 0.5 * (1 + cos(pi * e / E))`` with e = the epoch of the step (stepped per epoch)."""

    def schedule(step):
        epoch = jnp.minimum(step // steps_per_epoch, epochs - 1)
        return base * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))

    return schedule


def sgd_optimizer(
    learning_rate: float, weight_decay: float, momentum: float, epochs: int, steps_per_epoch: int
) -> optax.GradientTransformation:
    """PyTorch-style SGD: decay added to the gradient before momentum; per-epoch cosine LR."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(epoch_cosine(learning_rate, epochs, steps_per_epoch), momentum=momentum),
    )


def score_optimizer(settings: SearchSettings, steps_per_epoch: int) -> optax.GradientTransformation:
    """The scores' optimizer: SGD (PyTorch-style, the paper's), Adam or AdamW, with the
    per-epoch cosine; weight decay is added to the gradient (AdamW: decoupled)."""
    s = settings
    schedule = epoch_cosine(s.learning_rate, s.epochs, steps_per_epoch)
    if s.optimizer == 'sgd':
        return sgd_optimizer(s.learning_rate, s.weight_decay, s.momentum, s.epochs, steps_per_epoch)
    if s.optimizer == 'adamw':
        return optax.adamw(schedule, weight_decay=s.weight_decay)
    return optax.chain(optax.add_decayed_weights(s.weight_decay), optax.adam(schedule))


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean softmax cross-entropy against integer labels, optionally smoothed."""
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


# A batch is a tuple ``(inputs, labels, ...)`` or a dict; these keys name its parts.
INPUT_KEYS = ('inputs', 'image', 'images', 'x')
LABEL_KEYS = ('label', 'labels', 'targets', 'y')
# ``loss_fn(outputs, batch) -> (loss, {name: value})``: the scalar the scores minimise and
# named scalar metrics (averaged per epoch and, in evaluation, over the examples).
LossFn = Callable[[Any, Any], tuple[jax.Array, dict[str, jax.Array]]]


def _part(batch: Any, index: int, keys: tuple[str, ...], what: str) -> Any:
    if isinstance(batch, Mapping):
        for key in keys:
            if key in batch:
                return batch[key]
        raise KeyError(
            f'a dict batch needs its {what} under one of {keys}, got keys {sorted(batch)}; '
            f'rename the key, or pass a loss_fn (and inputs_fn) that reads your batches'
        )
    return batch[index]


def batch_inputs(batch: Any) -> Any:
    """The model's input of a batch: ``batch[0]``, or a dict's ``inputs`` / ``image`` / ..."""
    return _part(batch, 0, INPUT_KEYS, 'model inputs')


def batch_labels(batch: Any) -> Any:
    """The integer labels of a batch: ``batch[1]``, or a dict's ``label`` / ``labels`` / ..."""
    return _part(batch, 1, LABEL_KEYS, 'labels')


def classification_loss(label_smoothing: float = 0.0) -> LossFn:
    """The default task: softmax cross-entropy against integer labels, and top-1."""

    def loss_fn(logits, batch):
        labels = batch_labels(batch)
        top1 = jnp.mean(jnp.argmax(logits, -1) == labels)
        return cross_entropy(logits, labels, label_smoothing), {'top1': top1}

    return loss_fn


def init_search_state(
    frozen_params: Mapping,
    statistics: Mapping,
    masks: dict[str, jax.Array],
    scores: dict[str, jax.Array],
    optimizer: optax.GradientTransformation,
) -> SearchState:
    """A fresh search state; the optimizer only ever sees the scores."""
    return SearchState(
        frozen_params=frozen_params,
        scores=scores,
        masks=masks,
        statistics=statistics,
        opt_state=optimizer.init(scores),
        step=jnp.zeros((), jnp.int32),
        ever_flipped={p: jnp.zeros(m.shape, bool) for p, m in masks.items()},
    )


@dataclasses.dataclass(frozen=True)
class MaskSchedule:
    """How the masks move from step to step: the per-layer pruned ``counts`` they keep,
    the update rule (``mask_update``) at the rate ``rate_schedule`` gives each of the
    ``epochs`` of ``steps_per_epoch`` steps, within the groups of an N:M ``pattern`` if
    given; from step ``mask_frozen_from`` on (if given) they stay as they are.
    ``swap_margin`` > 0 ranks kept weights that much higher in the update
    (:func:`sparsity.with_swap_margin`): a pruned weight comes back only if it beats the
    one it replaces by more than the margin."""

    counts: Mapping[str, int]
    steps_per_epoch: int
    epochs: int
    mask_update: str = 'short_restriction'
    rate_schedule: str = 'constant'
    pattern: tuple[int, int] | None = None
    mask_frozen_from: int | None = None
    swap_margin: float = 0.0

    def update(
        self, scores: dict[str, jax.Array], masks: dict[str, jax.Array], step: jax.Array
    ) -> tuple[dict[str, jax.Array], jax.Array]:
        """The masks after a step's score update, and the swap rate they moved at."""
        # The update ranks these; the optimizer keeps learning the scores themselves.
        ranking = (
            sparsity.with_swap_margin(scores, masks, self.swap_margin)
            if self.swap_margin
            else scores
        )
        epoch = step // self.steps_per_epoch
        constant = self.rate_schedule == 'constant'
        rate = None if constant else sparsity.swap_rate(self.rate_schedule, epoch, self.epochs)
        counts, mode = self.counts, self.mask_update
        if self.pattern:
            new, _ = structured.update_masks(
                ranking, masks, counts, *self.pattern, mode=mode, rate=rate
            )
        else:
            new, _ = sparsity.update_masks(ranking, masks, counts, mode=mode, rate=rate)
        swap_rate = jnp.float32(1.0) if rate is None else rate
        if self.mask_frozen_from is not None:
            frozen = step >= self.mask_frozen_from
            new = {p: jnp.where(frozen, masks[p], m) for p, m in new.items()}
            swap_rate = jnp.where(frozen, 0.0, swap_rate)
        return new, swap_rate


def search_step(
    state: SearchState,
    *batch: Any,
    schedule: MaskSchedule,
    optimizer: optax.GradientTransformation,
    model: nn.Module | None = None,
    forward: adapters.Forward | None = None,
    bn_mode: str = 'train',
    rng: jax.Array | None = None,
    loss_fn: LossFn | None = None,
    inputs_fn: Callable[[Any], Any] = batch_inputs,
) -> tuple[SearchState, Metrics]:
    """One search step (pure; see :func:`make_search_step` for the jitted form).

    The model is ``forward`` (see :mod:`jackpot_jax.core.adapters`), or a Linen ``model``
    called with ``train=`` whose ``batch_stats`` collection is ``state.statistics``. ``bn_mode``
    'frozen' runs it in eval mode (statistics kept as they are, no dropout). ``rng``,
    folded with the step number, feeds the model's random streams (dropout). The masks
    move as ``schedule`` says. ``batch`` is ``images, labels`` or one batch (a tuple or a
    dict); ``loss_fn(outputs, batch)`` (default: :func:`classification_loss`) gives the
    loss and named metrics, ``inputs_fn(batch)`` the model's input.
    """
    batch = batch[0] if len(batch) == 1 else batch
    loss_fn = loss_fn or classification_loss()
    if forward is None:
        forward = adapters.linen_forward(model, 'batch_stats')
    train = bn_mode == 'train'
    step_rng = None if rng is None else jax.random.fold_in(rng, state.step)

    def objective(scores):
        params = sparsity.masked_params(state.frozen_params, state.masks, scores)
        outputs, statistics = forward(
            params, state.statistics, inputs_fn(batch), train=train, rng=step_rng
        )
        loss, task_metrics = loss_fn(outputs, batch)
        return loss, (task_metrics, statistics)

    (loss, (task_metrics, statistics)), grads = jax.value_and_grad(objective, has_aux=True)(
        state.scores
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, state.scores)
    scores = optax.apply_updates(state.scores, updates)
    masks, swap_rate = schedule.update(scores, state.masks, state.step)
    # Mask changes and flip-backs both come from this one comparison.
    flipped = {p: masks[p] != state.masks[p] for p in masks}
    changes = {p: jnp.sum(f, dtype=jnp.int32) for p, f in flipped.items()}
    flip_backs = {p: jnp.sum(flipped[p] & state.ever_flipped[p], dtype=jnp.int32) for p in masks}

    metrics = {
        'loss': loss,
        **task_metrics,
        'mask_changes': sum(changes.values()),
        'mask_changes_per_layer': changes,
        'flip_backs': sum(flip_backs.values()),
        'flip_backs_per_layer': flip_backs,
        'swap_rate': swap_rate,
        # False once any score is inf or NaN: the search stops (metrics.EpochMetrics).
        'scores_finite': jnp.all(jnp.array([jnp.isfinite(v).all() for v in scores.values()])),
    }
    new_state = state.replace(
        scores=scores,
        masks=masks,
        statistics=statistics,
        opt_state=opt_state,
        step=state.step + 1,
        ever_flipped={p: state.ever_flipped[p] | flipped[p] for p in masks},
    )
    return new_state, metrics


def mask_freeze_step(fraction: float, epochs: int, steps_per_epoch: int) -> int | None:
    """First step of the last ``int(fraction * epochs)`` epochs, when masks stop changing.

    None (never) when that is zero epochs, e.g. ``fraction == 0`` (the paper).
    """
    frozen_epochs = int(fraction * epochs)
    return (epochs - frozen_epochs) * steps_per_epoch if frozen_epochs else None


def make_search_step(
    state_sharding: Any = None, **settings: Any
) -> Callable[..., tuple[SearchState, Metrics]]:
    """The jitted search step with the state donated. ``settings`` are the fields of
    :class:`MaskSchedule` and the other keywords of :func:`search_step`, and
    ``label_smoothing``, the default loss's (:func:`classification_loss`).

    ``state_sharding`` (a SearchState of ``NamedSharding``, e.g. from
    :func:`jackpot_jax.core.parallel.state_sharding`) is where the new state is placed, so a
    state given in that layout keeps it from step to step and its buffers are reused;
    the metrics are then replicated over the same mesh. None: XLA chooses. The settings
    are those :meth:`~jackpot_jax.core.settings.SearchSettings.check` has checked.
    """
    fields = [f.name for f in dataclasses.fields(MaskSchedule)]
    schedule = MaskSchedule(**{name: settings.pop(name) for name in fields if name in settings})
    smoothing = settings.pop('label_smoothing', 0.0)
    settings['loss_fn'] = settings.get('loss_fn') or classification_loss(smoothing)
    step = functools.partial(search_step, schedule=schedule, **settings)
    if state_sharding is None:
        return jax.jit(step, donate_argnums=0)
    mesh = jax.tree.leaves(state_sharding)[0].mesh
    metrics_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(step, donate_argnums=0, out_shardings=(state_sharding, metrics_sharding))

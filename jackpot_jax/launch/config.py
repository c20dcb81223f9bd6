"""The base configuration (the embedded digits demo), the protocols, and list fields.

Every file under ``configs/`` starts from :func:`get_config` and overrides a few
fields, so ``config_checks.validate`` can reject unknown keys and bad values before
any work starts. This file is itself a config file: ``--config=jackpot_jax/launch/config.py``.
It imports only ml_collections and the pure-Python :mod:`jackpot_jax.core.settings`, so
loading a config never imports JAX.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from jackpot_jax.core import settings

CPU_COLLECTIVES = ('', 'gloo', 'mpi')
# config.jackpot = 'none': no jackpot (evaluate the weights as they are). Modes that
# never read config.jackpot accept it too.
NO_JACKPOT = 'none'
NO_JACKPOT_MODES = ('evaluate', 'pretrain')
# Modes that refuse model.dtype='bfloat16': 'overlap' ranks weights by SNIP/GraSP/SynFlow
# gradients, which bfloat16 would blur into ties.
FLOAT32_ONLY_MODES = ('overlap',)
# Variants of mode 'stability': the paper's protocol, each change of the stable one on
# its own, and the stable protocol.
STABILITY_VARIANTS = ('paper', 'paper+reestimation', 'paper+freeze', 'stable')
# What config.protocol sets for every field left unset (None, "set by the protocol"): the
# library's table (jackpot_jax.core.settings.PROTOCOLS) under the config's field names,
# applied by the library's one rule (settings.fill_protocol) when the launcher resolves
# its config at its entry (config_checks.resolved).
# 'stable': a validation split for every choice, BatchNorm statistics re-estimated
# under each evaluated mask, the mask held fixed over the last quarter of the epochs
# (at rate 1 it otherwise oscillates between near-tied weights to the end), and the
# jackpot chosen on the validation split kept as the result.
# 'paper': the published protocol, exactly as the authors' released code runs it
# (the last epoch's jackpot is the result).
PROTOCOLS = {
    protocol: {
        ('data.' if name == 'validation_fraction' else 'search.') + name: value
        for name, value in fields.items()
    }
    for protocol, fields in settings.PROTOCOLS.items()
}


def get_config() -> ml_collections.ConfigDict:
    """Digits demo: pretrain a small CNN, then search a 90%-sparse jackpot in it."""
    config = ml_collections.ConfigDict()
    config.mode = 'demo'
    # 'stable' (default) | 'paper': fills every field below that is left unset; see PROTOCOLS.
    config.protocol = 'stable'
    config.seed = 0
    config.num_devices = 0  # devices of the data-parallel mesh; 0 = all.
    # Devices that share one copy of the search state (frozen weights, scores, masks,
    # optimizer state), each holding 1/fsdp of every large array; must divide the device
    # count. 1 = a full copy on every device. See docs/scale_out.md.
    config.fsdp = 1
    # Dense weights to search in; '' means WORKDIR/pretrained (made by 'pretrain').
    config.pretrained = ''
    # The jackpot to evaluate, tune or export; '' means WORKDIR/jackpot (made by 'search'),
    # 'none' evaluates the weights as they are.
    config.jackpot = ''
    # Nothing that exists is replaced unless this is True: 'pretrain' refuses existing
    # weights, a search refuses a config.jackpot outside its workdir and a jackpot (or
    # tuned weights) it would not resume, 'tune' refuses WORKDIR/tuned and 'export'
    # WORKDIR/masked_weights, each before any work starts.
    config.overwrite = False
    # Cap on training steps per epoch (0 = whole epochs); for smoke tests and benchmarks.
    config.steps_per_epoch = 0

    config.data = _data()

    config.model = ml_collections.ConfigDict()
    config.model.name = 'small_cnn'
    # Computation dtype: 'float32' | 'bfloat16' (params, scores, optimizer state and
    # BatchNorm statistics stay float32; logits and loss are float32 either way).
    config.model.dtype = 'float32'
    config.model.width = 64  # keyword arguments of the model besides its name and dtype.

    config.pretrain = _weight_training(epochs=30, learning_rate=0.05, weight_decay=5e-4)

    config.search = _search()

    # Optional weight tuning under the found mask (the paper's "+T" rows); 0 epochs = none.
    config.tune = _weight_training(epochs=0, learning_rate=0.01, weight_decay=0.0)

    # Search checkpoints in WORKDIR/checkpoints: every N steps (0 = each epoch's end only),
    # keeping the latest `keep` and those of every epoch the selection rule may still
    # choose (those no later epoch equals or beats on the selection split).
    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 0
    config.checkpoint.keep = 3

    _add_studies(config)

    # Multi-host runs (one process per host, e.g. a Cloud TPU pod): the launcher calls
    # jax.distributed.initialize before any other JAX use. Left at their defaults, the
    # coordinator, process count and id are detected (Cloud TPU, SLURM, Open MPI).
    config.distributed = ml_collections.ConfigDict()
    config.distributed.initialize = False
    config.distributed.coordinator_address = ''  # 'host:port' of process 0.
    config.distributed.num_processes = 0  # 0 = auto.
    config.distributed.process_id = -1  # -1 = auto.
    config.distributed.cpu_collectives = ''  # 'gloo' for multi-process runs on CPUs.
    return config


def _data() -> ml_collections.ConfigDict:
    """The dataset and how it is read."""
    data = ml_collections.ConfigDict()
    data.name = 'digits'
    data.data_dir = ''  # '' = the dataset's default location.
    data.eval_batch_size = 512
    # Share of the training images held out as the validation split, the only split any
    # selection looks at (the test split is reported, never used to choose); in [0, 1).
    # Unset = set by config.protocol (stable: 0.1, paper: 0).
    data.validation_fraction = placeholder(float)
    # Cores the tfds input pipeline may use (a private tf.data thread pool); 0 = every core.
    data.threads = 0
    # 'tfds:NAME' (any tfds image-classification dataset, prepared in data_dir) only:
    data.image_size = 0  # model input height = width; 0 = the dataset's own size.
    data.resize = 0  # > 0: shorter side resized to this, then an image_size crop
    #                         (random in training, centred in eval); 0 = resize to image_size.
    data.random_flip = False  # random horizontal flips in training.
    data.mean = '0.5'  # of [0, 1] pixels: one value, or one per channel, comma-separated.
    data.std = '0.5'
    data.eval_split = ''  # '' = 'test', else 'validation'.
    # Text datasets only: tokens per window, the model's input length (at most a language
    # model's context); 0 = 128 for 'python_source' (bytes), 256 for 'python_docs' (the
    # Python documentation's prose in the LLaMA's tokens, configs/smollm2.py:lm_pruning).
    data.context = 0
    # 'python_docs' only: > 0 keeps the first windows of the validation and test parts up
    # to this many tokens, so each epoch's evaluation costs a bounded time; 0 = all.
    data.max_eval_tokens = 0
    # Where 'python_docs' caches its tokenized parts; '' = $XDG_CACHE_HOME/jackpot_jax.
    data.cache_dir = ''
    # Mode 'evaluate' of a language model (configs/smollm2.py): the UTF-8 text file whose
    # perplexity is printed; '' = evaluate a jackpot instead.
    data.text_file = ''
    return data


def _search() -> ml_collections.ConfigDict:
    """The search's options: the fields of SearchSettings (core/settings.py)."""
    search = ml_collections.ConfigDict()
    search.sparsity = 0.9  # fraction of prunable weights removed.
    search.allocation = 'global_magnitude'  # | 'uniform' | 'erk'
    search.epochs = 10
    search.batch_size = 64
    search.learning_rate = 0.1
    search.weight_decay = 5e-4
    search.momentum = 0.9  # of 'sgd'.
    # The scores' optimizer: 'sgd' (the paper's, PyTorch-style) | 'adam' | 'adamw'.
    search.optimizer = 'sgd'
    search.label_smoothing = 0.0
    search.pruned_score = 0.99  # initial score of magnitude-pruned weights.
    # 'magnitude' (the paper) | 'kaiming' (edge-popup's scaled Kaiming uniform) | 'random' U(0,1).
    search.score_init = 'magnitude'
    search.mask_update = 'short_restriction'  # | 'edge_popup'
    search.rate_schedule = 'constant'  # rate 1 every step | 'poly4' | 'cosine'
    search.bn_mode = 'train'  # | 'frozen': keep the pre-trained running statistics.
    # > 0: evaluate each epoch, and save the jackpot, with BatchNorm statistics re-estimated
    # over N training batches under the current mask (no weight or mask changes; the search
    # itself goes on with its own running statistics). 0 = the paper's: the search's own.
    # Unset = set by config.protocol (stable: 50, paper: 0).
    search.reestimation_steps = placeholder(int)
    # Fraction of the final epochs during which the masks stay fixed (the scores and the
    # BatchNorm statistics still train): ends the late oscillation between near-tied weights.
    # In [0, 1); 0 = never (the paper). Unset = set by config.protocol (stable: 0.25, paper: 0).
    search.mask_freeze_fraction = placeholder(float)
    # A hysteresis on the short restriction's threshold: kept weights rank this much
    # higher in the mask update, so a pruned weight comes back only if its score beats
    # the one it replaces by more than the margin (counts stay exact). >= 0; 0 = none
    # (the paper). Unset = set by config.protocol (stable: 0, paper: 0).
    search.swap_margin = placeholder(float)
    # Which epoch's jackpot the search saves: 'last', or a rule over the validation top-1
    # (needs data.validation_fraction > 0; never chosen on test): 'one_standard_error' (the
    # latest epoch within one binomial standard error of the best), 'best' (the latest on
    # ties), 'best_frozen' (the best with the final masks). Unset = set by config.protocol
    # (stable: 'one_standard_error', paper: 'last'; without a validation split: 'last').
    search.selection_rule = placeholder(str)
    # The validation metric the epoch is chosen by: 'top1', or a lower-is-better one
    # such as 'loss' or 'perplexity' (a language model's).
    search.selection_metric = 'top1'
    # Its direction: 'min' (lower is better) or 'max'. Unset: read from the metric's name
    # (loss, perplexity, error: 'min'; top1, accuracy: 'max'); a name that does not tell is
    # refused, never guessed.
    search.selection_mode = placeholder(str)
    # Also evaluate every epoch with the other statistics (the search's running ones and ones
    # re-estimated under the mask), recorded as *_running / *_reestimated: a diagnostic.
    search.compare_statistics = False
    # Regexes over parameter paths (core/choices.py: every kernel but the classifier's and
    # a ViT's conv_proj).
    search.prune_include = settings.choices.DEFAULT_INCLUDE
    search.prune_exclude = settings.choices.DEFAULT_EXCLUDE
    # Also leave dense the kernels whose output is the model's output (its classifier),
    # found by tracing the model, whatever their names.
    search.dense_output_layer = True
    # 'N:M' (e.g. '2:4'): keep N of every M consecutive input-channel weights in each
    # prunable layer whose input channels are a multiple of M (the others stay dense);
    # search.sparsity must then equal (M - N) / M (search.allocation is not used).
    # '' = unstructured.
    search.pattern = ''
    # Also record every step's loss, mask changes and flip-backs in the epoch records.
    search.step_trace = False
    return search


def _weight_training(
    epochs: int, learning_rate: float, weight_decay: float
) -> ml_collections.ConfigDict:
    """A weight-training group ('pretrain', 'tune'): SGD with momentum, a per-epoch cosine."""
    group = ml_collections.ConfigDict()
    group.epochs = epochs
    group.batch_size = 64
    group.learning_rate = learning_rate
    group.weight_decay = weight_decay
    group.momentum = 0.9
    group.label_smoothing = 0.0
    return group


def _add_studies(config: ml_collections.ConfigDict) -> None:
    """The groups of the modes that compare searches and criteria."""
    # Mode 'overlap': other pruning criteria at the jackpot's per-layer counts.
    config.overlap = ml_collections.ConfigDict()
    config.overlap.criteria = 'magnitude,random,snip,grasp,synflow,wanda'  # comma-separated.
    config.overlap.batch_size = 0  # SNIP/GraSP scoring batch; 0 = search.batch_size.
    # > 0: also evaluate with BatchNorm statistics re-estimated over N batches.
    config.overlap.reestimation_steps = 0

    # Studies that run one search per variant, in WORKDIR/<mode>/<variant> (resumable).
    # Mode 'search_cost': score inits compared by epochs to reach a test top-1 target.
    config.search_cost = ml_collections.ConfigDict()
    config.search_cost.inits = 'magnitude,kaiming,random'  # comma-separated score inits.
    config.search_cost.target = 0.0  # test top-1 to reach; 0 = the 'kaiming' search's final one.
    # Mode 'restriction': mask-update rules side by side, with per-step telemetry.
    config.restriction = ml_collections.ConfigDict()
    config.restriction.variants = 'constant,poly4,cosine,edge_popup'
    # Mode 'sweep': accuracy vs sparsity (jackpot, magnitude and random masks).
    config.sweep = ml_collections.ConfigDict()
    config.sweep.sparsities = '0.5,0.7,0.8,0.9,0.95'
    # Mode 'stability': what makes a jackpot's accuracy swing from epoch to epoch. Each
    # variant records both BatchNorm statistics every epoch and every step's mask changes.
    config.stability = ml_collections.ConfigDict()
    config.stability.variants = 'paper,paper+reestimation,paper+freeze,stable'
    # Mode 'lm_pruning': a language model's test perplexity under magnitude, random and
    # Wanda masks and under jackpots searched from the magnitude and Wanda masks, all at
    # the same per-layer counts; each jackpot's epoch chosen on validation perplexity.
    config.lm_pruning = ml_collections.ConfigDict()
    config.lm_pruning.sparsities = '0.5,0.7,2:4'  # fractions pruned per layer, or N:M patterns.
    config.lm_pruning.calibration_batches = 8  # Wanda's and SparseGPT's calibration batches.
    # Each search's first scores: 'flat' (1.0 where kept, search.pruned_score where pruned),
    # 'ranked:SPREAD' (ranked_scores: the start masks' criterion's order, e.g. ranked:0.02)
    # or 'scaled' (scaled_scores: the criterion itself, per column of its boundary); a
    # comma-separated list searches each and keeps the lowest validation perplexity.
    config.lm_pruning.start_scores = 'flat'


# A search resumes from WORKDIR/checkpoints only under the config it started with: its
# identity. Every field of get_config() is classified here, by dotted name, a group's name
# standing for all of its fields; tests/test_config.py checks that the two lists cover
# every field exactly once, so a new field must be classified where it is added.
# May change when a search resumes: where things are and run, what runs after the search,
# what is only recorded, which epoch's jackpot is saved (chosen from the same epochs),
# and whether existing outputs may be replaced.
RESUMABLE_FIELDS = (
    'mode', 'pretrained', 'jackpot', 'num_devices', 'fsdp', 'distributed', 'checkpoint',
    'data.data_dir', 'data.eval_batch_size', 'data.threads', 'data.text_file',
    'data.max_eval_tokens', 'data.cache_dir',
    'tune', 'pretrain', 'overlap', 'search_cost', 'restriction', 'sweep', 'stability',
    'lm_pruning',
    'search.step_trace', 'search.compare_statistics', 'search.selection_rule',
    'search.selection_metric', 'search.selection_mode', 'overwrite',
)  # fmt: skip
# A resumed search must share these with the one that wrote the checkpoint. A field in
# neither list (a model's own keyword, e.g. configs/vit_digits.py's) counts as identity.
SEARCH_IDENTITY_FIELDS = (
    'protocol', 'seed', 'steps_per_epoch', 'model',
    'data.name', 'data.validation_fraction', 'data.image_size', 'data.resize',
    'data.random_flip', 'data.mean', 'data.std', 'data.eval_split', 'data.context',
    'search.sparsity', 'search.allocation', 'search.epochs', 'search.batch_size',
    'search.learning_rate', 'search.weight_decay', 'search.momentum', 'search.optimizer',
    'search.label_smoothing', 'search.pruned_score', 'search.score_init',
    'search.mask_update', 'search.rate_schedule', 'search.bn_mode',
    'search.reestimation_steps', 'search.mask_freeze_fraction', 'search.swap_margin',
    'search.prune_include', 'search.prune_exclude', 'search.dense_output_layer',
    'search.pattern',
)  # fmt: skip


def _covers(entry: str, name: str) -> bool:
    return name == entry or name.startswith(entry + '.')


def fields(config: ml_collections.ConfigDict) -> dict[str, object]:
    """Every leaf field of ``config`` by dotted name (``'search.sparsity'``) -> its value."""
    out = {}

    def walk(tree: dict, prefix: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f'{prefix}{key}.')
            else:
                out[prefix + key] = value

    walk(config.to_dict(), '')
    return out


def is_resumable(name: str) -> bool:
    """Whether the field of dotted ``name`` may change when a search resumes."""
    return any(_covers(entry, name) for entry in RESUMABLE_FIELDS)


def search_identity(config: ml_collections.ConfigDict) -> dict[str, object]:
    """The fields (dotted name -> value) a resumed search must share with the one that
    wrote its checkpoint: every field that is not resumable."""
    return {name: value for name, value in fields(config).items() if not is_resumable(name)}


def search_identity_fields(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The dotted names of :func:`search_identity`, sorted."""
    return tuple(sorted(search_identity(config)))


def parse_list(name: str, text: str, kind: type = str) -> tuple:
    """A comma-separated config field as a tuple of ``kind``; empty or unparsable -> ValueError."""
    items = [item.strip() for item in str(text).split(',') if item.strip()]
    if not items:
        raise ValueError(f'{name} is empty; give a comma-separated list')
    try:
        return tuple(kind(item) for item in items)
    except ValueError:
        raise ValueError(f'{name}={text!r}: every item must be a {kind.__name__}') from None


def is_no_jackpot(jackpot: str) -> bool:
    """Whether a ``config.jackpot`` value means "no jackpot" ('none', any case)."""
    return str(jackpot).strip().lower() == NO_JACKPOT

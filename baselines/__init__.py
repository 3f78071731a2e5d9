"""The baselines LSS is compared with, each one mode module (`lss_megatron.modes.base.Mode`):
``nvidia_sp`` (Megatron TP + sequence_parallel) and ``ulysses`` (DeepSpeed-Ulysses; its core
attention is ``ulysses_attention``). The registry (`lss_megatron.modes`) names them by dotted path
and imports them lazily; nothing in the core imports them. Installed as ``lss_megatron.baselines``:
import them by that name only."""

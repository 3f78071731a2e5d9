"""DeepSpeed-Ulysses as the core attention: `lss_megatron.modes.ulysses`."""

from lss_megatron.modes.ulysses import (
    MODE,
    UlyssesCoreAttention,
    layer_spec,
    post_build,
    sp_bytes_per_layer,
)

__all__ = ["MODE", "UlyssesCoreAttention", "layer_spec", "post_build", "sp_bytes_per_layer"]

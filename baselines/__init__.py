"""The baselines LSS is compared with, at the top level where the design puts them. Their code is
the modes' own (`lss_megatron/modes/`); these modules only re-export it, and nothing in
lss_megatron imports them."""

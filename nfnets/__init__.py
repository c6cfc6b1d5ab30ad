"""NFNets in JAX/Haiku: Normalizer-Free Networks (Brock et al., ICML 2021).

The package re-exports the main model class; everything else lives in its own
module (`nfnets.models.layers`, `nfnets.optim`, `nfnets.data`, ...).
"""

from nfnets.models.nfnet import VARIANTS, NFNet

__all__ = ['NFNet', 'VARIANTS']

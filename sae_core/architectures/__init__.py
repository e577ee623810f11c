"""One architecture per module; each registers itself at import (see sae_core.registry.discover)."""

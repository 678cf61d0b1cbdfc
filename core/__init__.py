"""ConPreDiff's method as a library: the context term for your own diffusers training loop.

    from core import ContextConfig, attach_context
    context = attach_context(unet, scheduler, ContextConfig(strides=(1, 2, 3)))
    ...
    loss = F.mse_loss(unet(x_t, t).sample, noise) + context(x0, noise, t)

See README "ConPreDiff in your own training loop". Names load lazily, so ``import core.runlog`` stays light.
"""

_EXPORTS = {
    "ContextConfig": "core.config",
    "ContextPrediction": "core.objective",
    "ContextTerm": "core.objective",
    "attach_context": "core.objective",
    "w2_sets": "core.wasserstein",
    "gather_neighbors": "core.neighborhood",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'core' has no attribute {name!r}")

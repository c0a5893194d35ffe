"""The type of every method class: what happens when a method is constructed."""

from __future__ import annotations

import inspect
from typing import Any


class MethodMeta(type):
    """The metaclass of :class:`~flora.methods.FederatedPromptModule`.

    * Calling a method class sets the task given as ``class_names`` once the whole
      constructor chain has returned, so ``set_task`` (and any override of it) sees
      every part the method builds after ``super().__init__(**kwargs)``.
    * ``inspect.signature(cls)`` lists every constructor option of the class, following
      ``**kwargs`` up the base classes as jsonargparse does (a subclass's own default
      wins), so ``help(FLORA)`` shows ``lr`` and ``n_ctx`` beside FLORA's own options.
    """

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        module = type.__call__(cls, *args, **kwargs)
        class_names = module.__dict__.pop("_class_names_given", None)
        if class_names is not None:
            module.set_task(class_names)
        return module

    @property
    def __signature__(cls) -> inspect.Signature:
        options: dict[str, inspect.Parameter] = {}
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            params = list(inspect.signature(init).parameters.values())[1:]
            for p in params:
                if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                    options.setdefault(p.name, p.replace(kind=p.KEYWORD_ONLY))
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                break
        return inspect.Signature(list(options.values()))

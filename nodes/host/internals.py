"""The pack's reach into ComfyUI internals that have no public API, all in this one file.

Everything else in ``nodes/`` goes through the host's public machinery (``ModelPatcher.clone``,
``comfy.model_management.load_models_gpu``, ``comfy.samplers.encode_model_conds``,
``comfy.sd.load_lora_for_models``, ``comfy.utils.ProgressBar``). What is left, and why:

* ``comfy.model_management.current_loaded_models``: the host has no call that unloads *one*
  patcher (``unload_model_and_clones`` unloads every clone, the user's input MODEL with it, since
  clones share ``clone_base_uuid``); training copies must be unloaded, and a clone that patched shared
  weights in place must be unloaded (which restores the originals) before its memory is aliased.
* ``ModelPatcher.backup`` / ``object_patches_backup`` / ``pinned`` / ``weight_inplace_update``: a
  private clone must not inherit the input's restore bookkeeping, nor write patched weights into
  memory it shares with the input.
* ``comfy.model_management.in_training``: a module-level flag some models read to pick
  autograd-safe kernels; the host's own trainer sets it the same way.
* ``comfy_extras.nodes_train``'s checkpointing helpers (a node file, not a library): the host's
  own way of wrapping the highest modules with a forward in ``torch.utils.checkpoint``.
* ``server.PromptServer.instance.send_progress_text``: the text under a node while it runs.

Each is feature-detected (``getattr``/``hasattr``), so a host that drops one degrades to a clear
error or to no progress text, never to a silently different computation.
"""
from __future__ import annotations

import contextlib
import inspect

import comfy.model_management


def unload_where(match) -> None:
    """Unload, and forget, every loaded patcher for which ``match(patcher)`` holds."""
    loaded = comfy.model_management.current_loaded_models
    for i in range(len(loaded) - 1, -1, -1):
        patcher = loaded[i].model
        if patcher is not None and match(patcher):
            loaded.pop(i).model_unload()


def shares_patched_weights(model) -> bool:
    """Whether another clone of this network patched the shared weights in place (its backup holds them)."""
    return bool(getattr(model, "backup", None))


def forget_restore_state(clone) -> None:
    """A clone on a network of its own: none of the input's restore bookkeeping applies to it."""
    clone.backup, clone.object_patches_backup = {}, {}
    if hasattr(clone, "pinned"):
        clone.pinned = set()


def patches_in_place(clone) -> bool:
    """Whether loading this clone writes its patched weights into the weight tensors themselves."""
    return bool(getattr(clone, "weight_inplace_update", False))


def can_reload(model) -> bool:
    """Whether the host can load a fresh, non-dynamic copy of this MODEL (``clone(force_deepcopy=True)``,
    through the loader's ``cached_patcher_init``; ComfyUI 0.33 and newer)."""
    return ("force_deepcopy" in inspect.signature(model.clone).parameters
            and getattr(model, "cached_patcher_init", None) is not None)


def is_dynamic(model) -> bool:
    """A DynamicVRAM patcher (``ModelPatcher.is_dynamic``, 0.33 on NVIDIA)."""
    return bool(getattr(model, "is_dynamic", lambda: False)())


@contextlib.contextmanager
def in_training():
    """``comfy.model_management.in_training`` set while training, as the host's trainer sets it."""
    mm = comfy.model_management
    was = getattr(mm, "in_training", None)
    if was is None:  # a host without the flag
        yield
        return
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = was


def checkpointing_helpers():
    """(modules to checkpoint in a network, wrap one, unwrap one): the host trainer's own helpers."""
    from comfy_extras.nodes_train import find_all_highest_child_module_with_forward, patch, unpatch

    return find_all_highest_child_module_with_forward, patch, unpatch


def send_progress_text(text: str, node_id) -> None:
    """Show ``text`` under the node in the browser, where a server runs (not in scripts or tests)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None and node_id is not None:
        server.send_progress_text(text, node_id)

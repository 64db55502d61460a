"""Closing a replaced vLLM engine frees it at once (pure logic: a stand-in engine object, no
vLLM). A stopped engine still referenced by its backend held its weights and KV cache while
the next engine was built, and for the rest of the instance's life."""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace
from typing import Any

from runtime.backend.vllm_engine import VllmBackend


class _Engine:
    """What ``VllmBackend`` reads of a built engine, with a reference cycle as vLLM's objects
    have (refcounting alone never frees it)."""

    def __init__(self) -> None:
        model = SimpleNamespace(max_model_len=64, get_vocab_size=lambda: 32)
        self.vllm_config = SimpleNamespace(
            model_config=model, cache_config=SimpleNamespace(block_size=16)
        )
        self.me = self


def _started() -> tuple[VllmBackend, weakref.ref[Any]]:
    made = [_Engine()]
    ref = weakref.ref(made[0])
    backend = VllmBackend(made.pop, lambda ids: "", eos_ids=[0])  # built: only it holds one
    backend.start()
    return backend, ref


def test_close_frees_the_engine_while_the_backend_is_still_referenced() -> None:
    gc.disable()  # only close's own collection may free it
    try:
        backend, ref = _started()
        backend.close("replaced by an engine for another model")
        assert ref() is None
        assert backend.engine is None
    finally:
        gc.unfreeze()
        gc.enable()


def test_close_freezes_what_survives_so_later_collections_skip_it() -> None:
    """vLLM's shutdown unfreezes the heap; close freezes the survivors again (after freeing
    the garbage: a frozen cycle would never be freed)."""
    gc.unfreeze()
    try:
        backend, ref = _started()
        survivor = [object()]
        backend.close("replaced by an engine for another model")
        assert ref() is None
        assert gc.get_freeze_count() > 0
        assert not any(o is survivor for o in gc.get_objects())  # frozen: not walked
    finally:
        gc.unfreeze()


def test_stop_alone_keeps_the_engine_for_the_running_instance() -> None:
    backend, ref = _started()
    backend.stop("instance is stopping")
    gc.collect()
    assert ref() is not None  # an instance that stops keeps its engine until the process ends


class _Acyclic:
    """An engine that refcounting frees: vLLM's engine client, whose finalizer runs vLLM's
    shutdown (and its own full collections) as soon as the last reference goes."""

    def __init__(self) -> None:
        model = SimpleNamespace(max_model_len=64, get_vocab_size=lambda: 32)
        self.vllm_config = SimpleNamespace(
            model_config=model, cache_config=SimpleNamespace(block_size=16)
        )


def _garbage_cycle() -> weakref.ref[Any]:
    cycle = _Acyclic()
    cycle.me = cycle  # type: ignore[attr-defined]
    return weakref.ref(cycle)


def test_a_replacing_load_skips_the_extra_collection_when_the_engine_is_gone() -> None:
    """``thorough=False`` (``open_vllm``): the engine went with its last reference, so close
    runs no full collection of its own (0.35 s of walking the heap here); other garbage
    waits, frozen, for the next engine's shutdown."""
    gc.disable()  # no automatic collection either
    try:
        made = [_Acyclic()]
        ref = weakref.ref(made[0])
        backend = VllmBackend(made.pop, lambda ids: "", eos_ids=[0])
        backend.start()
        other = _garbage_cycle()
        backend.close("replaced by an engine for another model", thorough=False)
        assert ref() is None
        assert other() is not None  # not collected, frozen
        assert gc.get_freeze_count() > 0
        gc.unfreeze()  # what the next engine's shutdown does before its collections
        gc.collect()
        assert other() is None
    finally:
        gc.unfreeze()
        gc.enable()


def test_a_replacing_load_still_collects_an_engine_held_by_a_cycle() -> None:
    """An engine that outlived its reference (vLLM left a cycle) is collected anyway: only
    that frees its weights and KV cache before the next build."""
    gc.disable()
    try:
        backend, ref = _started()  # _Engine holds a cycle
        backend.close("replaced by an engine for another model", thorough=False)
        assert ref() is None
    finally:
        gc.unfreeze()
        gc.enable()

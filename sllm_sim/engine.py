"""The discrete-event cluster simulation: a simulated clock, the gateway's own ``place``.

World model (docs/scheduler.md): a request goes to a ready instance of its function with a
free slot (``max_concurrency`` per instance), else waits; the function scales out by one
instance per ``max_concurrency`` waiting requests (up to ``max_instances``), each placed by the
scheduler. A node loads one checkpoint at a time from the best tier holding it at the moment
the load starts (store loads fill SSD and DRAM, SSD loads fill DRAM, LRU). An instance idle for
``keep_alive`` stops. A migration loads the victim's checkpoint on the target, resumes its
requests there (tokens / prefill rate + overhead), then the source loads the new model.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import deque
from dataclasses import dataclass

from gateway.scheduler.estimators import BandwidthModel, MigrationModels
from gateway.scheduler.policies import place
from gateway.scheduler.types import MigrationFit, NoCapacity, PlacementRequest
from sllm_sim.cluster import LoadJob, SimCluster, SimInstance, SimNode
from sllm_sim.config import SimConfig
from sllm_sim.results import SimResult
from sllm_sim.workload import Trace

_ARRIVAL, _LOAD_DONE, _RESUME_DONE, _REQUEST_DONE, _KEEPALIVE = range(5)


@dataclass
class _Move:
    """A migration in flight: ``replica`` loads on the target, then takes ``victim``'s
    requests; ``new`` waits for the victim's devices on the source."""

    victim: SimInstance
    replica: SimInstance
    new: SimInstance
    tokens: int = 0


class Simulation:
    def __init__(self, config: SimConfig, trace: Trace, policy: str) -> None:
        self.config = config
        self.trace = trace
        self.policy = policy
        self.rng = random.Random(config.seed)
        cl = config.cluster
        self.bw = {"dram": cl.dram_bw, "ssd": cl.ssd_bw, "store": cl.store_bw}
        self.cluster = SimCluster(cl, self.bw, self._tokens_of)
        self.bw_model = BandwidthModel()
        for node_id in self.cluster.nodes:  # the startup probe: what the node measured
            for tier, bw in self.bw.items():
                self.bw_model.seed(node_id, tier, bw)
        self.migration_models = MigrationModels()
        self.prior = MigrationFit()
        self.fits: dict[str, MigrationFit] = {}
        n = len(trace)
        self.first = [math.nan] * n
        self.done = [math.nan] * n
        self.epoch = [0] * n
        self.inst_of: list[SimInstance | None] = [None] * n
        self.pending: dict[int, deque[int]] = {}
        self.instances_of: dict[int, list[SimInstance]] = {}
        self.starved: dict[int, None] = {}
        self.moves: dict[int, _Move] = {}
        self.events: list[tuple[float, int, int, object]] = []
        self.seq = 0
        self.now = 0.0
        self.next_id = 0
        self.result = SimResult(policy=policy, rps=config.workload.rps, requests=n)

    # -- event plumbing ---------------------------------------------------------------------

    def _push(self, at: float, kind: int, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, payload))

    def run(self) -> SimResult:
        started = time.perf_counter()
        arrivals = self.trace.arrivals
        i, n = 0, len(arrivals)
        events = self.events
        while i < n or events:
            if i < n and (not events or arrivals[i] <= events[0][0]):
                self.now = arrivals[i]
                self._arrive(i)
                i += 1
                continue
            at, _, kind, payload = heapq.heappop(events)
            self.now = at
            if kind == _REQUEST_DONE:
                self._request_done(payload)  # type: ignore[arg-type]
            elif kind == _LOAD_DONE:
                self._load_done(payload)  # type: ignore[arg-type]
            elif kind == _KEEPALIVE:
                self._keepalive(payload)  # type: ignore[arg-type]
            else:
                self._resume_done(payload)  # type: ignore[arg-type]
        self.result.finish(self.trace, self.first, self.done, time.perf_counter() - started)
        self.result.migration_fits = {k: (f.a, f.b) for k, f in self.fits.items()}
        return self.result

    # -- requests ---------------------------------------------------------------------------

    def _arrive(self, i: int) -> None:
        f = self.trace.function[i]
        self.pending.setdefault(f, deque()).append(i)
        self._dispatch(f)
        if self.pending[f]:
            self._scale(f)

    def _dispatch(self, f: int) -> None:
        queue = self.pending.get(f)
        if not queue:
            return
        cap = self.config.workload.max_concurrency
        for inst in self.instances_of.get(f, ()):
            if inst.state != "ready":
                continue
            while queue and len(inst.active) < cap:
                self._start_request(inst, queue.popleft())
            if not queue:
                return

    def _start_request(self, inst: SimInstance, i: int) -> None:
        if not inst.active:
            inst.idle_epoch += 1
            self.cluster.dirty.add(inst.node)
        inst.active.append(i)
        model = self.trace.functions[inst.function].model
        first = self.now + self.trace.tokens_in[i] / model.prefill_tps
        self.first[i] = first
        self.inst_of[i] = inst
        done = first + self.trace.tokens_out[i] / model.decode_tps
        self._push(done, _REQUEST_DONE, (i, self.epoch[i]))

    def _request_done(self, payload: tuple[int, int]) -> None:
        i, ep = payload
        if ep != self.epoch[i]:
            return  # rescheduled by a migration stall
        inst = self.inst_of[i]
        assert inst is not None
        inst.active.remove(i)
        self.done[i] = self.now
        self._dispatch(inst.function)
        if not inst.active and inst.state == "ready":
            self._went_idle(inst)

    def _went_idle(self, inst: SimInstance) -> None:
        inst.idle_since = self.now
        inst.idle_epoch += 1
        self.cluster.dirty.add(inst.node)
        self._push(
            self.now + self.config.workload.keep_alive_s, _KEEPALIVE, (inst, inst.idle_epoch)
        )
        if self.config.cluster.reclaim_idle:
            self._retry_starved()

    def _keepalive(self, payload: tuple[SimInstance, int]) -> None:
        inst, ep = payload
        if inst.state == "ready" and not inst.active and inst.idle_epoch == ep:
            self._stop(inst)
            self._retry_starved()

    def _tokens_of(self, inst: SimInstance, now: float) -> tuple[int, int]:
        """Tokens in and out so far of ``inst``'s requests (what a migration must move)."""
        decode = self.trace.functions[inst.function].model.decode_tps
        tin = tout = 0
        for i in inst.active:
            tin += self.trace.tokens_in[i]
            if now > self.first[i]:
                tout += min(self.trace.tokens_out[i], int((now - self.first[i]) * decode))
        return tin, tout

    # -- scaling and placement --------------------------------------------------------------

    def _scale(self, f: int) -> None:
        insts = self.instances_of.setdefault(f, [])
        starting = sum(1 for x in insts if x.state in ("waiting", "loading"))
        cap = self.config.workload.max_concurrency
        need = -(-len(self.pending[f]) // cap) - starting
        while need > 0 and len(insts) < self.config.workload.max_instances:
            if not self._start_instance(f):
                self.starved[f] = None
                return
            need -= 1
        self.starved.pop(f, None)

    def _retry_starved(self) -> None:
        for f in list(self.starved):
            if f not in self.starved:
                continue
            del self.starved[f]
            if self.pending.get(f):
                self._scale(f)
                if f in self.starved:
                    return  # no capacity for it: none for the later ones either (FIFO)

    def _new_instance(self, f: int, node: str, devices: tuple[str, ...], state: str) -> SimInstance:
        self.next_id += 1
        fn = self.trace.functions[f]
        return SimInstance(
            f"i{self.next_id}", f, fn.checkpoint, fn.model.bytes, node, devices, state
        )

    def _start_instance(self, f: int) -> bool:
        fn = self.trace.functions[f]
        req = PlacementRequest(fn.name, fn.checkpoint, fn.model.bytes, fn.model.accelerators)
        snap = self.cluster.snapshot(self.now, fn.checkpoint, self.fits, self.prior)
        seed = self.rng.getrandbits(32) if self.policy == "random" else None
        t0 = time.perf_counter()
        result = place(snap, req, self.policy, seed)
        self.result.decision_seconds.append(time.perf_counter() - t0)
        if isinstance(result, NoCapacity):
            self.result.no_capacity += 1
            return False
        node = self.cluster.nodes[result.node]
        for victim_id in result.evict:
            victim = node.instances[victim_id]
            assert victim.state == "ready" and not victim.active, "evicted a busy instance"
            self._stop(victim)
            self.result.evictions += 1
        inst = self._new_instance(f, node.node_id, result.devices, "loading")
        self.instances_of[f].append(inst)
        node.instances[inst.instance_id] = inst
        self.cluster.dirty.add(node.node_id)
        m = result.migration
        if m is None:
            node.take(result.devices)
            self._enqueue(node, LoadJob(inst, fn.checkpoint, fn.model.bytes, self._forced()))
            return True
        victim = node.instances[m.victim]
        assert victim.state == "ready" and set(m.freed_devices) == set(victim.devices)
        node.take(tuple(d for d in result.devices if d not in m.freed_devices))
        target = self.cluster.nodes[m.target_node]
        target.take(m.target_devices)
        replica = self._new_instance(victim.function, target.node_id, m.target_devices, "loading")
        target.instances[replica.instance_id] = replica
        self.cluster.dirty.add(target.node_id)
        inst.state, victim.state = "waiting", "migrating"
        self.next_id += 1
        self.moves[self.next_id] = _Move(victim, replica, inst)
        job = LoadJob(replica, victim.checkpoint, victim.nbytes, False, self.next_id)
        self._enqueue(target, job)
        self.result.migrations += 1
        return True

    def _forced(self) -> bool:
        return self.policy == "download-every-time"

    def _stop(self, inst: SimInstance) -> None:
        node = self.cluster.nodes[inst.node]
        del node.instances[inst.instance_id]
        self.instances_of[inst.function].remove(inst)
        node.free.extend(inst.devices)
        self._unpin(node, inst)
        inst.state = "stopped"
        self.cluster.dirty.add(node.node_id)

    # -- loads and migrations ---------------------------------------------------------------

    def _tier(self, node: SimNode, job: LoadJob) -> str:
        if job.force_store:
            return "store"
        if job.checkpoint in node.dram.entries:
            return "dram"
        return "ssd" if job.checkpoint in node.ssd.entries else "store"

    def _enqueue(self, node: SimNode, job: LoadJob) -> None:
        job.est_s = job.nbytes / self.bw[self._tier(node, job)] + self.config.cluster.startup_s
        node.jobs.append(job)
        node.queued_s += job.est_s
        self.cluster.dirty.add(node.node_id)
        if node.current is None:
            self._start_next(node)

    def _start_next(self, node: SimNode) -> None:
        if not node.jobs:
            node.current = None
            node.queued_s = 0.0
            self.cluster.dirty.add(node.node_id)
            return
        job = node.jobs.pop(0)
        node.queued_s -= job.est_s
        job.tier = self._tier(node, job)
        job.transfer_s = job.nbytes / self.bw[job.tier]
        node.current = job
        node.current_end = self.now + job.transfer_s + self.config.cluster.startup_s
        self.cluster.dirty.add(node.node_id)
        self._push(node.current_end, _LOAD_DONE, node)

    def _load_done(self, node: SimNode) -> None:
        job = node.current
        assert job is not None
        self.bw_model.observe(node.node_id, job.tier, job.nbytes, job.transfer_s)
        self._fill_caches(node, job)
        inst = job.instance
        if job.for_migration >= 0:
            move = self.moves[job.for_migration]
            tin, tout = self._tokens_of(move.victim, self.now)
            move.tokens = tin + tout
            model = self.trace.functions[move.victim.function].model
            resume = move.tokens / model.prefill_tps + self.config.migration.overhead_s
            self._push(self.now + resume, _RESUME_DONE, job.for_migration)
        else:
            self.result.count_load(job.tier)
            inst.state = "ready"
            self.cluster.dirty.add(node.node_id)
            self._dispatch(inst.function)
            if not inst.active:
                self._went_idle(inst)
        self._start_next(node)

    def _fill_caches(self, node: SimNode, job: LoadJob) -> None:
        """A store load fills SSD and DRAM, an SSD load fills DRAM; the DRAM copy is pinned
        while the instance maps it."""
        key = job.checkpoint
        changed = [key]
        if job.tier == "store":
            changed += node.ssd.insert(key, job.nbytes) or []
        else:
            node.ssd.touch(key)
        if job.tier == "dram":
            node.dram.touch(key)
        else:
            changed += node.dram.insert(key, job.nbytes) or []
        for k in changed:
            self.cluster.cache_changed(node, k)
        if key in node.dram.entries:
            node.dram.pin(key)
            job.instance.pinned = True

    def _resume_done(self, mid: int) -> None:
        move = self.moves.pop(mid)
        victim, replica, new = move.victim, move.replica, move.new
        model = self.trace.functions[victim.function].model
        resume = move.tokens / model.prefill_tps + self.config.migration.overhead_s
        self.migration_models.observe(victim.checkpoint, move.tokens, resume)
        self.fits = self.migration_models.fits()
        stall = self.config.migration.stall_s
        for i in victim.active:
            finish = self._finish_of(i, victim)
            self.epoch[i] += 1
            self.inst_of[i] = replica
            if self.first[i] > self.now:
                self.first[i] += stall  # still in prefill: the first token is late too
            self._push(finish + stall, _REQUEST_DONE, (i, self.epoch[i]))
        replica.active, victim.active = victim.active, []
        replica.state = "ready"
        source = self.cluster.nodes[victim.node]
        del source.instances[victim.instance_id]
        self._unpin(source, victim)
        victim.state = "stopped"
        fn_insts = self.instances_of[victim.function]
        fn_insts[fn_insts.index(victim)] = replica
        self.cluster.dirty.update((source.node_id, replica.node))
        new.state = "loading"
        self._enqueue(source, LoadJob(new, new.checkpoint, new.nbytes, False))
        self._dispatch(replica.function)
        if not replica.active:
            self._went_idle(replica)

    def _unpin(self, node: SimNode, inst: SimInstance) -> None:
        if inst.pinned:
            node.dram.unpin(inst.checkpoint)
            inst.pinned = False

    def _finish_of(self, i: int, inst: SimInstance) -> float:
        model = self.trace.functions[inst.function].model
        return self.first[i] + self.trace.tokens_out[i] / model.decode_tps

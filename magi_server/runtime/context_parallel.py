"""Context parallelism: one video's model calls spread over several processes (GPUs) with torch.distributed.

The strategy is Ulysses, the reference MAGI-1's ``cp_ulysses``: in every forward each rank holds 1/N of the call's
tokens; around self-attention an all-to-all trades [1/N of the rows, every head] for [every row, 1/N of the heads],
so attention itself, MAGI-1's block-causal ranges, the KV cache (each rank keeps its own K/V groups) and every
attention backend run unchanged; the inverse all-to-all follows, and the output is gathered. The model
(:class:`magi_server.models.dit.VideoDiT`) only sees an object with three methods (:class:`ContextParallelGroup`,
handed to it with ``set_context_parallel``); this module owns everything else:

* process-group setup (:func:`init_context_parallel`): NCCL for the tensors on CUDA, gloo on the CPU, and always a
  gloo group with an unbounded wait for the leader's commands (a follower of an idle server waits for hours);
* the all-to-all and gather helpers the DiT calls (:class:`ContextParallelGroup`);
* "rank 0 leads, the others follow": rank 0 runs everything a single-process server runs (engine, prefill, VAE,
  outputs) through :class:`LeaderRunner`, a stand-in for the :class:`~magi_server.runtime.model_runner.ModelRunner`
  that, before each model call, broadcasts what the followers need to make the same call: a request's sampler state
  once it is prefilled (its canvas, captions, plan; the followers never run T5 or the VAE and only load the DiT),
  then the ids of each batched call, the releases and the shutdown. :func:`follow` is the followers' loop. Every
  collective happens on the thread that makes the model calls (the engine thread, or the caller of the pipeline),
  in the same order on every rank: the runner's prefill and output workers never touch the group;
* launching (:class:`ContextParallelLaunch`): N-1 follower processes started with ``torch.multiprocessing``
  (spawn), or started by ``torchrun`` and entering :func:`run_follower` themselves. Only rank 0 writes outputs.

Nothing here reads the environment: ranks, sizes and rendezvous addresses arrive as arguments. ``serve``/``worker
--cp N`` spawn their followers; a torchrun launch (ranks entering :func:`run_follower` from torchrun's variables,
read by the CLI) is not wired into the CLI yet.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import itertools
import logging
import os
import pickle
import socket
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from magi_server.runtime.model_runner import Prefilled

log = logging.getLogger("magi_server.runtime.context_parallel")

# Tensor collectives of a model call: a rank that waits this long on one is stuck (a peer died inside a call).
DATA_TIMEOUT = datetime.timedelta(minutes=30)
# Commands: a follower waits for the next one as long as the server is idle; a dead leader closes the connection,
# which ends the wait at once.
COMMAND_TIMEOUT = datetime.timedelta(days=365)


class ContextParallelError(RuntimeError):
    """The group cannot go on (a rank died, failed to load, or a collective failed). Like a lost device, it
    fails every later model call: ``device_lost`` says so to an engine that cannot import this module."""

    device_lost = True


def rank_device(device: torch.device | str, rank: int) -> torch.device:
    """The device of ``rank`` when the ranks of one box share out its GPUs from ``device`` on: cuda:(i + rank);
    on the CPU every rank uses the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.device("cuda", (device.index or 0) + rank)
    return device


def loopback_init_method() -> str:
    """A TCP rendezvous on a free loopback port (for ranks started on this machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


# ------------------------------------------------------------------------------------------------ the group
class ContextParallelGroup:
    """This process's place in a context-parallel group: the Ulysses exchanges the DiT calls (it implements
    :class:`magi_server.models.dit.ContextParallel`) and the leader -> follower command channel."""

    def __init__(self, rank: int, size: int, device: torch.device, data_group, command_group) -> None:
        self.rank = rank
        self.size = size
        self.device = device  # this rank's compute device; tensors travel on it (NCCL) or the CPU (gloo)
        self._data = data_group
        self._commands = command_group
        self._closed = False

    # -------------------------------------------------------------------------------- Ulysses exchanges (DiT)
    def sequence_to_heads(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """(shard, H, D) local rows of every head -> (total, H/size, D): every row of this rank's heads."""
        shard, heads, dim = x.shape
        n = self.size
        # block j (this rank's rows of head group j) goes to rank j; block i received holds rank i's rows
        send = x.view(shard, n, heads // n, dim).transpose(0, 1).contiguous()
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self._data)
        return received.view(n * shard, heads // n, dim)[:total]

    def heads_to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """(total, H/size, D) every row of this rank's heads -> (shard, H, D) this rank's rows of every head."""
        total, local_heads, dim = x.shape
        n = self.size
        shard = -(-total // n)
        if total == n * shard:
            send = x.contiguous()
        else:  # the last rank's padding rows: zeros, dropped again by the caller's next exchange
            send = x.new_zeros((n * shard, local_heads, dim))
            send[:total] = x
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self._data)
        # block i = this rank's rows of rank i's heads; heads are ordered by rank, as they were split
        return received.view(n, shard, local_heads, dim).permute(1, 0, 2, 3).reshape(shard, n * local_heads, dim)

    def gather_sequence(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """(shard, ...) this rank's rows -> (total, ...) every row, on every rank."""
        x = x.contiguous()
        gathered = x.new_empty((self.size * x.shape[0], *x.shape[1:]))
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(gathered, x, group=self._data)
        return gathered[:total]

    # ------------------------------------------------------------------------------------- command channel
    def send(self, command: tuple) -> None:
        """Leader: broadcast one command (a tuple of plain values) to every follower."""
        self._broadcast_command(command)

    def receive(self) -> tuple:
        """Follower: the leader's next command (waits as long as the leader is alive and silent)."""
        return self._broadcast_command(None)

    def _broadcast_command(self, command):
        box = [command]
        dist.broadcast_object_list(box, src=0, group=self._commands)
        return box[0]

    def send_with_object(self, command: tuple, obj) -> None:
        """Leader: broadcast ``command`` carrying an object that holds tensors (a sampler state). The tensors travel
        as tensors on the data group (device to device with NCCL), the rest pickled inside the command."""
        tensors: list[torch.Tensor] = []

        def persistent_id(value):
            if isinstance(value, torch.Tensor):
                tensors.append(value)
                return ("tensor", len(tensors) - 1, value.device.type)
            if isinstance(value, torch.device):
                return ("device", value.type)
            return None

        buffer = io.BytesIO()
        pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
        pickler.persistent_id = persistent_id
        pickler.dump(obj)
        shapes = [(t.dtype, tuple(t.shape)) for t in tensors]
        self.send((*command, buffer.getvalue(), shapes))
        for tensor in tensors:
            if tensor.numel():
                dist.broadcast(tensor.detach().to(self._transport).contiguous(), src=0, group=self._data)

    def receive_object(self, command: tuple):
        """Follower: the object a command from :meth:`send_with_object` carries. CPU tensors stay on the CPU, device
        tensors (and device fields, such as a KV cache's) land on this rank's device."""
        payload, shapes = command[-2:]
        tensors = []
        for dtype, shape in shapes:
            tensor = torch.empty(shape, dtype=dtype, device=self._transport)
            if tensor.numel():
                dist.broadcast(tensor, src=0, group=self._data)
            tensors.append(tensor)

        def place(kind: str) -> torch.device:
            return torch.device("cpu") if kind == "cpu" else self.device

        def persistent_load(key):
            if key[0] == "tensor":
                return tensors[key[1]].to(place(key[2]))
            if key[0] == "device":
                return place(key[1])
            raise pickle.UnpicklingError(f"unknown persistent id {key!r}")

        unpickler = pickle.Unpickler(io.BytesIO(payload))
        unpickler.persistent_load = persistent_load
        return unpickler.load()

    @property
    def _transport(self) -> torch.device:
        return self.device if dist.get_backend(self._data) == "nccl" else torch.device("cpu")

    def exchange_ready(self, error: str | None) -> list[str | None]:
        """Every rank says whether it loaded its model (None) or why not; all ranks get every answer."""
        answers: list = [None] * self.size
        dist.all_gather_object(answers, error, group=self._commands)
        return answers

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if dist.is_initialized():
                dist.destroy_process_group()


def init_context_parallel(rank: int, size: int, device: torch.device | str, init_method: str, *,
                          timeout: datetime.timedelta = DATA_TIMEOUT) -> ContextParallelGroup:
    """Join the group of ``size`` ranks meeting at ``init_method`` (``tcp://host:port``) as ``rank`` on ``device``.

    This process's default torch.distributed group becomes this group (one per process). NCCL when ``device`` is a
    GPU, gloo on the CPU; the commands always travel on a gloo group of their own."""
    device = torch.device(device)
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is outside a group of {size}")
    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a torch.distributed group")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, timeout=timeout,
                            **({"device_id": device} if device.type == "cuda" else {}))
    commands = dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT)
    return ContextParallelGroup(rank, size, device, dist.group.WORLD, commands)


# ------------------------------------------------------------------------------------------ leader and followers
@dataclass
class _Session:
    """What every LeaderRunner over one group shares (``with_outputs`` makes a second one over the same model)."""

    group: ContextParallelGroup
    processes: list = field(default_factory=list)  # follower processes this process started (spawn launch)
    lock: threading.Lock = field(default_factory=threading.Lock)
    keys: itertools.count = field(default_factory=itertools.count)
    broken: str | None = None
    closed: bool = False
    commands_sent: Counter = field(default_factory=Counter)  # by kind: what the followers were told

    def send(self, command: tuple, obj=None) -> None:
        if self.closed:
            raise ContextParallelError("the context-parallel group is shut down")
        if self.broken is not None:
            raise ContextParallelError(self.broken)
        try:
            if obj is None:
                self.group.send(command)
            else:
                self.group.send_with_object(command, obj)
            self.commands_sent[command[0]] += 1
        except Exception as exc:
            self.broken = f"the context-parallel group failed (a follower rank died?): {exc}"
            raise ContextParallelError(self.broken) from exc

    @contextlib.contextmanager
    def mirrored_call(self):
        """Rank 0's side of a model call the followers make too. If it fails here (out of memory, ...), the
        followers may be waiting inside the call's collectives, out of step with rank 0: the error goes to the
        caller (the engine fails that step's jobs) and every later command raises ContextParallelError."""
        try:
            yield
        except BaseException as exc:
            self.broken = f"a model call failed on rank 0, the ranks are out of step: {exc!r}"
            raise

    def close(self, timeout: float) -> None:
        with self.lock:
            if self.closed:
                return
            if self.broken is None:
                try:
                    self.group.send(("shutdown",))
                    self.commands_sent["shutdown"] += 1
                except Exception:  # a follower is gone already: nothing to tell it
                    log.warning("could not tell the followers to stop", exc_info=True)
            self.closed = True
        for process in self.processes:
            process.join(timeout)
            if process.is_alive():
                log.warning("follower process %s did not stop; terminating it", process.pid)
                process.terminate()
                process.join(5)
        self.group.close()


class LeaderRunner:
    """Rank 0's runner: a :class:`ModelRunner` (every method and attribute is the wrapped runner's) whose model
    calls the followers make too. Before a call it broadcasts what they need: a request's sampler state the first
    time (from :meth:`prefill`, or from :meth:`poll` when the prefill worker's ``Prefilled`` comes in), then the
    keys of the requests the call advances; releases free the followers' copies. Drive it from one thread."""

    def __init__(self, runner, session: _Session) -> None:
        self._runner = runner
        self._session = session
        self._shared: set[str] = set()  # engine jobs whose state the followers hold
        self._pipeline_keys: dict[int, tuple[str, object]] = {}  # id(state) -> (key, state kept alive)

    def __getattr__(self, name):
        return getattr(self._runner, name)

    @property
    def runner(self):
        """The wrapped single-process runner (its own calls are not mirrored)."""
        return self._runner

    @property
    def group(self) -> ContextParallelGroup:
        return self._session.group

    @property
    def cp_size(self) -> int:
        return self._session.group.size

    @property
    def commands_sent(self) -> Counter:
        """How many commands of each kind (install, advance, release, shutdown) the followers were sent."""
        return self._session.commands_sent

    @property
    def follower_processes(self) -> list:
        """The follower processes this process started (empty under torchrun)."""
        return list(self._session.processes)

    def with_outputs(self, outputs_dir, *, chunk_previews: bool = True, safety_checker=None) -> "LeaderRunner":
        """As ``ModelRunner.with_outputs``, over the same group (one runner at a time may make model calls)."""
        return LeaderRunner(self._runner.with_outputs(outputs_dir, chunk_previews=chunk_previews,
                                                      safety_checker=safety_checker), self._session)

    # ----------------------------------------------------------------------------------- the offline pipeline
    def prefill(self, params, **kwargs):
        state = self._runner.prefill(params, **kwargs)
        key = f"pipeline-{next(self._session.keys)}"
        self._session.send(("install", key), state)
        self._pipeline_keys[id(state)] = (key, state)
        return state

    def advance(self, states: Sequence) -> list:
        keys = []
        for state in states:
            entry = self._pipeline_keys.get(id(state))
            if entry is None:
                raise ValueError("this state was not prefilled by this runner; the followers do not hold it")
            keys.append(entry[0])
        self._session.send(("advance", tuple(keys)))
        with self._session.mirrored_call():
            chunks = self._runner.advance(states)
        for state in states:
            if state.done:  # the followers drop their copy after its last call too
                self._pipeline_keys.pop(id(state), None)
        return chunks

    # ------------------------------------------------------------------------------------------- the engine
    def poll(self) -> list:
        records = self._runner.poll()
        for record in records:
            if isinstance(record, Prefilled):
                state = self._runner.sampler_state(record.job_id)
                self._session.send(("install", record.job_id), state)
                self._shared.add(record.job_id)
        return records

    def step(self, job_ids: list[str]) -> list[str]:
        self._session.send(("advance", tuple(job_ids)))
        try:
            with self._session.mirrored_call():
                return self._runner.step(job_ids)
        finally:
            for job_id in job_ids:
                state = self._runner.sampler_state(job_id)
                if state is None or state.done:
                    self._shared.discard(job_id)

    def release(self, job_id: str) -> None:
        self._runner.release(job_id)
        if job_id in self._shared:
            self._shared.discard(job_id)
            if not self._session.closed and self._session.broken is None:
                self._session.send(("release", job_id))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the followers (they leave their loop and exit), then the wrapped runner's workers."""
        try:
            self._session.close(timeout)
        finally:
            self._runner.shutdown(timeout)


def follow(runner, group: ContextParallelGroup) -> None:
    """A follower's loop: hold the requests' sampler states the leader installs and make the same model calls
    (``runner.advance``) when told, until the leader says "shutdown". A state whose last call ran is dropped (the
    leader's runner is done with it too). Any failure ends the loop (the leader's next collective then fails)."""
    states: dict[str, object] = {}
    while True:
        command = group.receive()
        kind = command[0]
        if kind == "install":
            states[command[1]] = group.receive_object(command)
        elif kind == "advance":
            batch = [states[key] for key in command[1]]
            runner.advance(batch)
            for key, state in zip(command[1], batch):
                if state.done:
                    states.pop(key, None)
        elif kind == "release":
            states.pop(command[1], None)
        elif kind == "shutdown":
            return
        else:
            raise ContextParallelError(f"unknown command {kind!r} from the leader")


def run_follower(rank: int, size: int, load_runner: Callable[..., object], *,
                 device: torch.device | str, init_method: str, threads: int | None = None) -> None:
    """A follower process's whole life: join the group, load the model with ``load_runner(device=device)`` (a
    runner with the DiT only is enough: followers never run T5 or the VAE), say whether that worked, follow, leave.
    ``device`` is this rank's own device. Under torchrun every rank > 0 calls this."""
    device = torch.device(device)
    if threads is not None:
        torch.set_num_threads(max(1, threads))
    group = init_context_parallel(rank, size, device, init_method)
    try:
        try:
            runner = load_runner(device=device)
            runner.dit.set_context_parallel(group)
        except BaseException as exc:
            group.exchange_ready(f"rank {rank} could not load the model: {exc!r}")
            raise
        answers = group.exchange_ready(None)
        if any(answer is not None for answer in answers):
            return  # another rank failed; the leader reports it
        follow(runner, group)
    finally:
        group.close()


def _spawned_follower(rank, size, load_runner, device, init_method, threads) -> None:
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s cp-rank{rank} %(levelname)s %(name)s: %(message)s")
    try:
        run_follower(rank, size, load_runner, device=device, init_method=init_method, threads=threads)
    except Exception:
        # the leader died or failed (a closed connection ends the wait at once), or this rank failed: say so and
        # end with a failure status; the leader's next collective fails in turn
        log.exception("context-parallel follower rank %d stopped", rank)
        raise SystemExit(1) from None


def cpu_threads_per_rank(size: int) -> int:
    """The cores of this machine shared out among ``size`` CPU ranks (at least one each)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // size)


class ContextParallelLaunch:
    """The ranks of one group before rank 0 leads it.

    ``ContextParallelLaunch.spawn(size, load_follower, device=...)`` starts ranks 1..size-1 now (they join the group
    and load their models while this process loads its own); under torchrun, build it with ``processes=()`` and the
    rendezvous torchrun gave. Then :meth:`lead` turns rank 0's runner into the :class:`LeaderRunner`, or
    :meth:`abort` stops the followers when rank 0 could not load."""

    def __init__(self, size: int, device: torch.device | str, init_method: str, processes: Sequence = ()) -> None:
        if size < 2:
            raise ValueError(f"context parallelism needs 2 or more ranks, got {size}")
        self.size = size
        self.device = torch.device(device)
        self.init_method = init_method
        self.processes = list(processes)

    @classmethod
    def spawn(cls, size: int, load_follower: Callable[..., object], *, device: torch.device | str = "cpu",
              init_method: str | None = None) -> "ContextParallelLaunch":
        """Start follower ranks 1..size-1 as ``torch.multiprocessing`` spawn processes on this machine (daemons:
        they end with this process). ``load_follower(device=...)`` returns a follower's runner (a DiT-only
        ``ModelRunner`` is enough, see ``pipeline.load_dit_runner``); it must be picklable (a module-level function
        or a ``functools.partial`` of one)."""
        import torch.multiprocessing as mp

        device = torch.device(device)
        init_method = init_method or loopback_init_method()
        threads = cpu_threads_per_rank(size) if device.type == "cpu" else None
        context = mp.get_context("spawn")
        processes = []
        for rank in range(1, size):
            process = context.Process(
                target=_spawned_follower, name=f"magi-cp-rank{rank}", daemon=True,
                args=(rank, size, load_follower, str(rank_device(device, rank)), init_method, threads),
            )
            process.start()
            processes.append(process)
        return cls(size, device, init_method, processes)

    def lead(self, runner) -> LeaderRunner:
        """Join as rank 0 with ``runner`` (already loaded on this rank's device), wait until every follower has
        loaded its model, and return the runner that leads them. Raises ContextParallelError (having stopped the
        followers) when a rank could not load."""
        if self.device.type == "cpu" and self.processes:
            torch.set_num_threads(cpu_threads_per_rank(self.size))  # the cores are shared with the followers
        group = init_context_parallel(0, self.size, rank_device(self.device, 0), self.init_method)
        try:
            try:
                runner.dit.set_context_parallel(group)
            except BaseException as exc:
                group.exchange_ready(f"rank 0: {exc}")
                raise
            answers = group.exchange_ready(None)
        except BaseException:
            group.close()
            self.abort()
            raise
        failures = [answer for answer in answers if answer is not None]
        if failures:
            group.close()
            self.abort()
            raise ContextParallelError("; ".join(failures))
        return LeaderRunner(runner, _Session(group, self.processes))

    def abort(self, timeout: float = 10.0) -> None:
        """Stop the follower processes this launch started (rank 0 could not lead them)."""
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(timeout)

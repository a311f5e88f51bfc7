"""Tensor parallelism's ranks: rank 0 (the engine: scheduler, sampler, the requests) tells the
others what each step runs, and every rank runs the same forward on its shard.

A message is one broadcast of a small header, [command, payload length], then one of the payload:
a flat int64 tensor. A forward's payload is the step's tensors (token ids, RoPE rows, KV slots,
each prefill span's bounds, block table and mask, the decode rows' block tables and context
lengths): a few integers a token, no pickled objects. The messages travel on a gloo group of
their own (host tensors, also under NCCL, whose group the model's collectives use).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.kernels import cpu
from engine.layers.attention import AttentionMetadata, DecodeBackend, PrefillSpan
from engine.layers.parallel import TensorParallel
from engine.runner.model_spec import ModelSpec

logger = logging.getLogger(__name__)

FORWARD, LOGITS, COPY, STOP = range(4)
_NONE = -1  # an absent block table in a span's description


def encode_forward(input_ids: torch.Tensor, rope_rows: torch.Tensor, meta: AttentionMetadata,
                   layers: int = 0) -> torch.Tensor:
    """The step's forward inputs as one flat int64 tensor (what decode_forward reads back); layers:
    how many of the first layers run (0: all; speculative decoding's self-draft runs a few)."""
    decode = meta.decode
    rows, width = (0, 0) if decode is None else decode.block_tables.shape
    header = torch.tensor([len(input_ids), len(meta.prefills), rows, width, layers])
    parts = [header, input_ids, rope_rows, meta.slot_mapping]
    for span in meta.prefills:
        table = _NONE if span.block_table is None else len(span.block_table)
        parts.append(torch.tensor([span.start, span.end, span.context_len, table, int(span.mask is not None)]))
        parts += [p.reshape(-1) for p in (span.block_table, span.mask, span.positions) if p is not None]
    if decode is not None:
        parts += [decode.block_tables.reshape(-1), decode.context_lens]
    return torch.cat([p.to("cpu", torch.int64) for p in parts])


def decode_forward(flat: torch.Tensor, decoder: DecodeBackend, block_size: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, int]:
    """(input_ids [T], rope_rows [T], the step's AttentionMetadata, layers) from encode_forward's tensor."""
    reader = _Reader(flat.to(device))
    num_tokens, num_spans, rows, width, layers = reader.ints(5)
    input_ids, rope_rows, slots = reader.take(num_tokens), reader.take(num_tokens), reader.take(num_tokens)
    spans = []
    for _ in range(num_spans):
        start, end, ctx, table_len, masked = reader.ints(5)
        table = None if table_len == _NONE else reader.take(table_len)
        mask = reader.take((end - start) * ctx).view(end - start, ctx).bool() if masked else None
        positions = reader.take(end - start) if masked else None
        spans.append(PrefillSpan(start, end, ctx, table, mask, positions))
    meta = AttentionMetadata(slot_mapping=slots, prefills=spans, num_prefill_tokens=sum(s.end - s.start for s in spans))
    if rows:
        tables = reader.take(rows * width).view(rows, width)
        meta.decode = decoder.prepare(tables, reader.take(rows), block_size)
    return input_ids, rope_rows, meta, layers


class _Reader:
    def __init__(self, flat: torch.Tensor) -> None:
        self.flat, self.at = flat, 0

    def take(self, n: int) -> torch.Tensor:
        self.at += n
        return self.flat[self.at - n:self.at]

    def ints(self, n: int) -> list[int]:
        return self.take(n).tolist()


# A rank waits for rank 0's next message however long the engine idles; rank 0's sends and the
# model's collectives keep the timeout, so a dead or hung rank is noticed within it.
_IDLE = timedelta(days=365)


class Channel:
    """Rank 0's messages to the other ranks, on a gloo group (`group`)."""

    def __init__(self, group) -> None:
        self.group = group
        self.in_step = True  # False once a step failed midway (see RanksOutOfStep)

    def send(self, command: int, payload: torch.Tensor | None = None) -> None:
        n = 0 if payload is None else payload.numel()
        dist.broadcast(torch.tensor([command, n]), src=0, group=self.group)
        if n:
            dist.broadcast(payload, src=0, group=self.group)

    def receive(self) -> tuple[int, torch.Tensor | None]:
        header = self._wait(torch.empty(2, dtype=torch.int64))
        command, n = header.tolist()
        if not n:
            return command, None
        return command, self._wait(torch.empty(n, dtype=torch.int64))

    def _wait(self, tensor: torch.Tensor) -> torch.Tensor:
        """Receive one broadcast from rank 0 into `tensor`, waiting up to _IDLE for it."""
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor, opts.timeout = 0, 0, _IDLE
        self.group.broadcast([tensor], opts).wait()
        return tensor

    def all_built(self) -> None:
        """Every rank, its shard built, waits here for the others (up to START_TIMEOUT: a rank may
        take longer than a step to load its shard), so that no first step times out waiting."""
        opts = dist.AllreduceOptions()
        opts.timeout = START_TIMEOUT
        self.group.allreduce([torch.zeros(1)], opts).wait()

    def agree(self, num_blocks: int) -> int:
        """Every rank, its pool sized alone, takes the fewest blocks any rank can hold (a rank's
        warm-up may take longer than a step: up to START_TIMEOUT)."""
        opts = dist.AllreduceOptions()
        opts.reduceOp, opts.timeout = dist.ReduceOp.MIN, START_TIMEOUT
        box = torch.tensor([num_blocks])
        self.group.allreduce([box], opts).wait()
        return int(box)

    def send_spec(self, spec: ModelSpec) -> None:
        """Once, at start: what the ranks build (pickled; the steps' messages are not)."""
        dist.broadcast_object_list([spec], src=0, group=self.group)

    def receive_spec(self) -> ModelSpec:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    # --- rank 0 ---------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, rope_rows: torch.Tensor, meta: AttentionMetadata,
                layers: int = 0) -> None:
        self.send(FORWARD, encode_forward(input_ids, rope_rows, meta, layers))

    def logits(self, rows: list[int]) -> None:
        self.send(LOGITS, torch.tensor(rows, dtype=torch.int64))

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.send(COPY, torch.cat([src, dst]).cpu())

    def stop(self) -> None:
        self.send(STOP)


def follow(channel: Channel, runner) -> None:
    """Ranks 1..: run what rank 0 says until it says stop. runner: this rank's ModelRunner (its
    shard of the model and of the KV pool)."""
    hidden = None
    while True:
        command, payload = channel.receive()
        if command == FORWARD:
            ids, rows, meta, layers = decode_forward(payload, runner.decoder, runner.block_size, runner.device)
            caches = runner.kv_caches[:layers] if layers else runner.kv_caches
            hidden = runner.model(ids, rows, meta, caches)  # [T, hidden], the same on every rank
        elif command == LOGITS:
            runner.model.compute_logits(hidden[payload.to(hidden.device)])  # this rank's share, sent to rank 0
        elif command == COPY:
            src, dst = payload.to(runner.device).chunk(2)
            runner.copy_blocks(src, dst)
        elif command == STOP:
            return
        else:
            raise RuntimeError(f"unknown tensor-parallel command {command}")


# --- starting the ranks -----------------------------------------------------------------------
# Joining waits until every rank has started (a spawned rank imports torch before it gets there:
# seconds on a slow machine, longer under load), which the step timeout is not meant to bound.
START_TIMEOUT = timedelta(seconds=600)


def join(rank: int, size: int, init_method: str, device_type: str, timeout_s: float) -> tuple[TensorParallel, Channel]:
    """Join the process group (gloo on CPU, NCCL on CUDA) and the gloo group of rank 0's messages:
    the rendezvous waits up to START_TIMEOUT (or the step timeout, if longer), the collectives
    the step timeout."""
    backend = "nccl" if device_type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    store, _, _ = next(dist.rendezvous(init_method, rank, size, timeout=max(timeout, START_TIMEOUT)))
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout)
    return TensorParallel(rank, size), Channel(control)


def launched() -> tuple[int, int] | None:
    """(rank, world size) when torchrun (or another env:// launcher) started this process, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def share_cores(size: int) -> None:
    """Each rank's torch threads: its share of the cores (more would contend for them). size: the
    ranks on this machine."""
    size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))


class Ranks:
    """Rank 0's hold on ranks 1..: the channel to them and, when it spawned them, their processes."""

    def __init__(self, channel: Channel, procs: list, threads: int) -> None:
        self.channel, self.procs, self.threads = channel, procs, threads

    def stop(self) -> None:
        """Tell the ranks to stop (or, out of step, kill them) and leave the process group; this
        process gets its torch threads back."""
        if self.channel.in_step:
            try:
                self.channel.stop()
            except Exception:  # a rank already gone: it is killed below
                logger.warning("could not tell every tensor-parallel rank to stop", exc_info=True)
        for p in self.procs:
            p.join(timeout=10 if self.channel.in_step else 0)
            if p.is_alive():
                p.kill()
                p.join()
        dist.destroy_process_group()
        torch.set_num_threads(self.threads)


def start(size: int, device_type: str, timeout_s: float, spec: ModelSpec) -> tuple[TensorParallel, Ranks]:
    """Start ranks 1 .. size - 1 (or, under torchrun, find them), join them as rank 0 and send them
    the spec; (this rank's TensorParallel, the hold on the others)."""
    procs, init_method, who = [], "env://", launched()
    if who is None:
        init_method, procs = _spawn(size, device_type, timeout_s)
    elif who != (0, size):
        raise ValueError(f"tensor_parallel_size: {size}, but the launcher started rank {who[0]} of {who[1]} "
                         f"here (it must be rank 0 of {size})")
    threads = torch.get_num_threads()
    share_cores(size)
    try:
        tp, channel = join(0, size, init_method, device_type, timeout_s)
        channel.send_spec(spec)
    except BaseException:  # (a rank that failed to start, or this one: none is left waiting)
        for p in procs:
            p.kill()
        torch.set_num_threads(threads)
        raise
    return tp, Ranks(channel, procs, threads)


def _spawn(size: int, device_type: str, timeout_s: float) -> tuple[str, list]:
    """Start ranks 1 .. size - 1 as processes on this machine; (the init method, the processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_method = f"tcp://127.0.0.1:{port}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=run_rank, args=(rank, size, init_method, device_type, timeout_s), daemon=True,
                         name=f"kvserve-tp{rank}") for rank in range(1, size)]
    for p in procs:
        p.start()
    return init_method, procs


def run_rank(rank: int, size: int, init_method: str, device_type: str, timeout_s: float) -> None:
    """A rank other than 0: build the shard rank 0 describes, then run its steps until it says stop."""
    # Ctrl-C reaches every rank, torchrun passes SIGTERM on to each: rank 0 drains its requests,
    # then tells them to stop (if it dies instead, their next wait fails and they exit)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    share_cores(size)
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device(device_type, local if device_type == "cuda" else None)
    if device_type == "cuda":
        torch.cuda.set_device(device)  # (NCCL's communicator uses the current device)
    tp, channel = join(rank, size, init_method, device_type, timeout_s)
    try:
        spec = channel.receive_spec()
        if "cpp" in (spec.backends.elementwise, spec.backends.attention) or spec.backends.skinny_linears:
            cpu.load()  # rank 0 loaded the C++ kernels when it chose them; this process has not
        model = spec.build_model(device, tp)
        runner = spec.build_runner(model, device, channel.agree(spec.num_blocks(model, device)))
        channel.all_built()
        follow(channel, runner)
    finally:
        dist.destroy_process_group()

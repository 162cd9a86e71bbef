"""The process group a rank joins, and every collective zeromix runs itself (DeepSpeed's engine runs its own).

On a card the group is NCCL's, and NCCL has no CPU collectives: a tensor handed to all-reduce or broadcast
must live on the rank's card, or the first step fails with "No backend type associated with device type
cpu". gloo, which the CPU simulation and the tests use, accepts tensors anywhere, so a CPU run cannot show
that mistake. Hence one door: `RankComm` is bound to the rank's device, makes the tensors it reduces there,
and refuses one that lives elsewhere with a message naming the rule, on CPU as on a card. No other module in
workers/ or orchestrator/ imports torch.distributed or deepspeed.comm (tests/test_collectives.py holds
that, and that every tensor made in workers/ names its device).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import socket

    import torch


@dataclass(frozen=True)
class RankInfo:
    rank: int  # within the group it joins: the job's, or in outer-step mode its box's
    world_size: int
    master_addr: str
    master_port: int
    # Outer-step mode (workers/outer_steps.py): every box is a DeepSpeed world of its own, and its rank 0 also joins
    # the leaders' group across boxes at outer_addr:outer_port (box 0's leader hosts it).
    box: int = 0
    boxes: int = 1
    first_rank: int = 0  # the job-wide index of the box's rank 0: the job's config lists ranks box by box
    outer_addr: str = ""
    outer_port: int = 0
    life: int = 0  # times the box's ranks were started again after it was lost (then it asks back in: BoxLink.ask_back)

    @property
    def job_rank(self) -> int:
        """The rank's index in the job's config (its rank in its box's group, after the boxes before it)."""
        return self.first_rank + self.rank

    @property
    def hosts_group(self) -> bool:
        """Whether this rank hosts its group's rendezvous: its box's (or the job's) rank 0 does."""
        return self.rank == 0

    @property
    def hosts_link(self) -> bool:
        """Whether this rank hosts the box leaders' rendezvous, in outer-step mode: box 0's leader does."""
        return self.rank == 0 and self.box == 0 and self.outer_port != 0


def first_ranks(boxes: tuple[int, ...]) -> list[int]:
    """Each box's first job rank: a job lists its ranks box by box (`boxes`: ranks per box)."""
    return list(accumulate((0, *boxes[:-1])))


def rank_infos(boxes: tuple[int, ...], meet: list[tuple[str, int]], outer_meet: tuple[str, int] = ("", 0)) -> list[RankInfo]:
    """Where each rank of a job meets its peers, in rank order: `boxes` ranks per box (one box: a synchronous job),
    each box's group at its `meet` address and port, the box leaders' link at `outer_meet`."""
    return [RankInfo(r, size, addr, port, box, len(boxes), first, *outer_meet)
            for box, (size, first, (addr, port)) in enumerate(zip(boxes, first_ranks(boxes), meet)) for r in range(size)]


def hosted_ports(info: RankInfo) -> tuple[int, ...]:
    """The ports of the rendezvous a rank hosts (its launcher binds them for it)."""
    return (info.master_port,) * info.hosts_group + (info.outer_port,) * info.hosts_link


def rendezvous_store(addr: str, port: int, world: int, timeout_s: float, host: bool, hosted: socket.socket | None = None):
    """The TCPStore where a group meets, at addr:port. Its host listens on `hosted`, the socket its launcher bound
    when it chose the port (workers/ports.py: bound since, so no other process took the port meanwhile); the
    store owns the socket from then on. A host given only a port binds it now. The others connect, retrying until
    `timeout_s`."""
    from datetime import timedelta

    import torch.distributed as dist

    listen_fd = hosted.detach() if host and hosted is not None else None  # (the store closes it: Python must not)
    return dist.TCPStore(addr, port, world, is_master=host, timeout=timedelta(seconds=timeout_s), wait_for_workers=False,
                         master_listen_fd=listen_fd)


class CollectiveOffDevice(RuntimeError):
    """A collective was handed a tensor that is not on the rank's device."""


@dataclass(frozen=True)
class RankComm:
    rank: int  # in this group (the box's, in outer-step mode)
    world: int
    device: torch.device
    job_rank: int = -1  # the rank's index in the job's config (rank + the box's first rank); -1: the same as rank

    @property
    def me(self) -> int:
        return self.rank if self.job_rank < 0 else self.job_rank

    @classmethod
    def join(cls, info: RankInfo, hosted: socket.socket | None = None) -> RankComm:
        """Join the job's process group: NCCL on the rank's card (each rank sees only its own card, so it is
        device 0), gloo on the CPU. The device is set before the group exists, so NCCL binds to it. Rank 0 hosts
        the group's rendezvous, on `hosted` where the launcher bound its port for it (see `rendezvous_store`)."""
        import torch

        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        import torch.distributed as dist
        from deepspeed.constants import default_pg_timeout

        os.environ.update(MASTER_ADDR=info.master_addr, MASTER_PORT=str(info.master_port),
                          RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK="0")
        device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
        if on_gpu:
            torch.cuda.set_device(device)
        store = rendezvous_store(info.master_addr, info.master_port, info.world_size, default_pg_timeout.total_seconds(),
                                 host=info.hosts_group, hosted=hosted)
        # As DeepSpeed's own start would (it then finds the group made): the card bound where there are peers.
        dist.init_process_group("nccl" if on_gpu else "gloo", store=store, rank=info.rank, world_size=info.world_size,
                                timeout=default_pg_timeout, device_id=device if on_gpu and info.world_size > 1 else None)
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False)
        return cls(dist.get_rank(), dist.get_world_size(), device, info.job_rank)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def tensor(self, values, dtype) -> torch.Tensor:
        """Values as a tensor on this rank's device, ready for a collective."""
        import torch

        return torch.tensor(values, dtype=dtype, device=self.device)

    def zeros(self, shape, dtype) -> torch.Tensor:
        import torch

        return torch.zeros(shape, dtype=dtype, device=self.device)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce in place (sum over ranks); returns the tensor."""
        import torch.distributed as dist

        self._check(tensor, "sum")
        dist.all_reduce(tensor)
        return tensor

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor on every rank, in place; returns the tensor."""
        import torch.distributed as dist

        self._check(tensor, "broadcast")
        dist.broadcast(tensor, src=0)
        return tensor

    def from_first(self, value):
        """Rank 0's `value` on every rank (a picklable object: what rank 0 alone decided, e.g. which
        checkpoint to load). Its bytes travel as a tensor on this rank's device."""
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.on_gpu:
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def leave(self) -> None:
        """Wait for every rank, then close the group (a rank that leaves early would break a peer's last collective)."""
        import torch.distributed as dist

        self.barrier()
        dist.destroy_process_group()

    def _check(self, tensor, what: str) -> None:
        if tensor.device != self.device:
            raise CollectiveOffDevice(
                f"{what}: a {tuple(tensor.shape)} {tensor.dtype} tensor on {tensor.device}, but this rank's collectives "
                f"run on {self.device}; NCCL has no CPU collectives, so every tensor a collective sees must be made on "
                f"the rank's device (RankComm.tensor / RankComm.zeros)")


@dataclass
class BoxLink:
    """The group of box leaders (each box's rank 0) across the slow link between boxes, for outer steps. It is
    gloo over TCP whatever the boxes run inside (a 1 GbE link between boxes is what gloo's TCP is for), so its
    tensors live in host memory, as the outer state does (workers/outer_steps.py); every byte handed to it is
    counted, so the traffic across boxes is measured, not estimated.

    Two gloo groups, one per direction: a box sends to a later box on `up` and to an earlier one on `down`. On one
    group, two boxes' send and receive share one TCP connection, and gloo moved them one after the other there: an
    exchange between two boxes took 1.7-2x the time of one way across a 1 Gbit/s link (bench/slow_link.py's link,
    2026-12-05); one direction per connection runs both ways at the line rate.

    The boxes meet in the rendezvous store first (`meet`), not in a gloo collective, so a box whose node died is
    left out there instead of breaking a collective: box 0's leader decides which boxes meet, and the gloo groups
    are formed again over them. A box that comes back asks in through the store (`ask_back`), and box 0's leader
    lets it in at its next meeting."""

    box: int
    boxes: int
    up: object  # torch.distributed.ProcessGroupGloo, outside the default group the box's DeepSpeed uses
    down: object
    store: object  # their rendezvous (kept alive with them), hosted by box 0's leader
    timeout_s: float = 600  # how long a leader waits for the others at a meeting
    members: tuple[int, ...] = ()  # the boxes still in the job, in order (all of them until one leaves)
    meetings: int = 0  # meetings held: each one's keys in the store are its own
    exchanges: int = 0  # exchanges since the last meeting (two at the job's start, one at each outer step)
    bytes_sent: int = 0  # what this leader sent across the link: in a ring all-gather over k boxes, k-1 payloads
    life: int = 0  # this box's life: times its ranks were started again after it was lost (RankInfo.life)
    lives: dict = field(default_factory=dict)  # box 0's leader: each box's life now (0 where never lost)

    @classmethod
    def join(cls, info: RankInfo, lost: Callable[[], dict[int, int]] = dict, timeout_s: float = 600,
             hosted: socket.socket | None = None) -> BoxLink:
        """Box 0's leader hosts the rendezvous (on `hosted` where given: see `rendezvous_store`); the others connect to
        it (each waits up to `timeout_s` for the rest, then fails naming the address). Box 0's leader waits for every
        box's leader, or for `lost()` (the job's driver, as at a meeting) to name one: a box lost before the boxes
        first met (its node unplugged while the job started) fails the job as lost at once, and the scheduler places
        it again from its last checkpoint on the cards left, rather than box 0 waiting out `timeout_s` and the job
        failing as if it had a bug."""

        def unmet(err: Exception) -> RuntimeError:  # (torch raises several kinds for a peer that never came)
            return RuntimeError(f"box {info.box}: the leaders of the {info.boxes} boxes did not meet at {info.outer_addr}:"
                                f"{info.outer_port} within {timeout_s:.0f} s ({err}); check that every box reaches that address")

        try:
            store = rendezvous_store(info.outer_addr, info.outer_port, info.boxes, timeout_s, host=info.hosts_link, hosted=hosted)
            store.set(f"joined/{info.box}", "")
        except Exception as err:
            raise unmet(err) from err
        if info.hosts_link:
            _wait_for_leaders(store, info.boxes, lost, timeout_s, unmet)
        try:
            up, down = _gloo_pair(store, "boxes", info.box, info.boxes, timeout_s)
        except Exception as err:
            raise unmet(err) from err
        return cls(info.box, info.boxes, up, down, store, timeout_s, tuple(range(info.boxes)))

    @classmethod
    def ask_back(cls, info: RankInfo, timeout_s: float = 600) -> BoxLink:
        """A box that comes back (its ranks started again while the others train): connect to box 0's store and ask
        in. It belongs to no group until box 0's leader lets it in at a meeting (`let_in`)."""
        store = rendezvous_store(info.outer_addr, info.outer_port, info.boxes, timeout_s, host=False)
        store.set(f"ask/{info.box}", str(info.life))
        return cls(info.box, info.boxes, None, None, store, timeout_s, life=info.life)

    def let_in(self, wait_s: float) -> bool:
        """A box asking back in: whether box 0's leader let it in (it then meets from that meeting on), waiting up to
        `wait_s`."""
        key, deadline = f"let-in/{self.box}/{self.life}", time.monotonic() + wait_s
        while not self.store.check([key]):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        self.meetings, self.exchanges = int(self.store.get(key)), 0
        return True

    def meet(self, head: torch.Tensor, lost: Callable[[], dict[int, int]] = dict,
             let_in: bool = True) -> tuple[dict[int, torch.Tensor], tuple[int, ...]]:
        """Every box's `head` (a small host tensor, the same shape and dtype on each), by box, for the boxes that meet.
        Each leader posts its own in the store; box 0's leader waits for every member's, or for `lost()` (the job's
        driver, which sees a box's processes die: each lost box and which of its lives was lost) to name the box,
        lets in the boxes that asked back in, and posts who
        met; a box that did not is out of the job from here on, and the link is formed again over the boxes that met.
        A meeting no box was lost from moves a few hundred bytes through the store. Returns the headers by box and the
        boxes let back in at this meeting (their headers are empty); none where `let_in` is off (the job's last outer
        step: a box let in there would train nothing)."""
        import torch

        n, self.meetings, self.exchanges = self.meetings, self.meetings + 1, 0
        self.store.set(f"head/{n}/{self.box}", head.numpy().tobytes())
        if self.box == 0:
            met, back = self._gather(n, lost, let_in)
            self.store.set(f"met/{n}", f"{','.join(map(str, met))}|{','.join(map(str, back))}")
        met, back = (tuple(int(b) for b in part.split(",") if b) for part in self._get(f"met/{n}").decode().split("|"))
        if self.box not in met:
            raise RuntimeError(f"box {self.box} was lost: box 0 went on without it at outer step {n}")
        heads = {b: torch.frombuffer(bytearray(self._get(f"head/{n}/{b}")), dtype=head.dtype) for b in met}
        self.bytes_sent += (len(met) - 1) * head.numel() * head.element_size()  # what this header costs the link: it reaches
        # every other box that met once (through box 0's store), as in a ring; the store's keys and the list of boxes are not counted
        if met != self.members or back:  # (a box let back in is a new process, even where it was lost and back between meetings)
            self.members = met
            self.up, self.down = _gloo_pair(self.store, f"boxes-{n}", met.index(self.box), len(met), self.timeout_s)
        return heads, back

    def _gather(self, n: int, lost: Callable[[], dict[int, int]], let_in: bool) -> tuple[list[int], list[int]]:
        """Box 0's leader: the boxes that meet (the members whose header came, once every other one is known lost;
        checked last, too: a box lost after its header came is out), and of them those let back in at this meeting
        (a box asking back in with a life that was not lost: its ranks started again; maybe before this meeting knew
        its last life was lost)."""
        deadline = time.monotonic() + self.timeout_s
        gone, reported = _wait_for_boxes(self.store, {b: (f"head/{n}/{b}", f"ask/{b}") for b in self.members}, lost,
                                         self._reported_lost, deadline, self._late(n))
        let = [b for b in range(1, self.boxes) if let_in and self._let_in(b, n, reported)]
        back = self._still_there(n, let, lost, deadline)
        return sorted({b for b in self.members if b not in gone} | set(back)), back

    def _still_there(self, n: int, let: list[int], lost: Callable[[], dict[int, int]], deadline: float) -> list[int]:
        """Box 0's leader: of the boxes just let in, those whose header came (each posts it once it reads that it is
        in), leaving out one whose new life the driver reports lost meanwhile: a box that asked and then died (its
        node unplugged again) would otherwise be a member of the link formed next, and the others would wait out the
        link's timeout for it, then restart the job."""
        dead, _ = _wait_for_boxes(self.store, {b: (f"head/{n}/{b}",) for b in let}, lost,
                                  self._reported_lost, deadline, self._late(n))
        return [b for b in let if b not in dead]

    def _late(self, n: int) -> Callable[[list[int]], Exception]:
        return lambda waiting: RuntimeError(f"box 0: box(es) {waiting} did not reach outer step {n} within {self.timeout_s:.0f} s "
                                            "and none was reported lost: a collective timeout across boxes")

    def _let_in(self, box: int, n: int, reported: dict[int, int]) -> bool:
        """Box 0's leader: whether `box` asks back in with a life not reported lost, letting it in at meeting `n`."""
        if not self.store.check([f"ask/{box}"]):
            return False
        life = int(self.store.get(f"ask/{box}"))
        self.store.delete_key(f"ask/{box}")  # (a life that asked and was lost before this meeting stays out: another will ask)
        if life <= reported.get(box, -1):
            return False
        self.lives[box] = life
        self.store.set(f"let-in/{box}/{life}", str(n))
        return True

    def _get(self, key: str) -> bytes:
        from datetime import timedelta

        self.store.wait([key], timedelta(seconds=2 * self.timeout_s))  # (box 0 waits up to timeout_s for the others first)
        return self.store.get(key)

    def exchange(self, tensor: torch.Tensor, lost: Callable[[], dict[int, int]] | None = None) -> list[torch.Tensor]:
        """Every member box's `tensor` (same shape and dtype on each), in box order: a ring all-gather, each box
        sending to the next while it receives from the one before. With `lost` (the driver's record, which box 0's
        leader asks, as at a meeting), a box lost during it is left out: the boxes left form the link again and
        exchange again among themselves, and `members` then says whose tensors came. That holds whether the lost
        box's process died (its sockets closed: the ring breaks) or its node was unplugged (no reset comes: the
        ring waits), and however many boxes are left (a survivor stuck in a receive from another survivor gives it
        up too). Each leader runs the ring in a helper thread and posts how it ended in the store; box 0's leader
        posts the verdict every box waits for (`_verdict`)."""
        if tensor.device.type != "cpu":
            raise CollectiveOffDevice(f"exchange across boxes: a {tuple(tensor.shape)} tensor on {tensor.device}; the link "
                                      "between boxes is gloo over TCP and takes host tensors (the outer state lives in host RAM)")
        key, self.exchanges = f"{self.meetings}.{self.exchanges}", self.exchanges + 1
        while True:
            out, met = self._attempt(tensor, key, lost)
            if met == self.members:
                self.bytes_sent += (len(met) - 1) * tensor.numel() * tensor.element_size()
                return out
            if self.box not in met:
                raise RuntimeError(f"box {self.box} was lost: box 0 went on without it during the exchange after meeting {self.meetings - 1}")
            key, self.members = f"{key}-{'.'.join(map(str, met))}", met  # (the exchange again, over the boxes left)
            self.up, self.down = _gloo_pair(self.store, f"boxes-{key}", met.index(self.box), len(met), self.timeout_s)

    def _attempt(self, tensor: torch.Tensor, key: str, lost: Callable[[], dict[int, int]] | None) -> tuple[list | None, tuple[int, ...]]:
        """One ring over the members, in a helper thread: a gloo wait cannot be polled (`is_completed` turns true
        only through `wait`, and a `wait` that times out closes the connection), so a ring given up on an unplugged
        node ends in its thread when gloo's timeout does, its error dropped there; it holds its receive buffers
        until then. Returns the ring's tensors and the boxes the verdict keeps."""
        import threading

        ended, ways, watch = {}, (self.members, self.up, self.down), _Watch(time.monotonic() + self.timeout_s)

        def ring() -> None:
            try:
                ended["out"] = _ring(tensor, self.box, *ways)
            except Exception as err:  # (gloo: "Connection closed by peer", its timeout, ...)
                ended["err"] = err

        threading.Thread(target=ring, name=f"exchange {key} across boxes", daemon=True).start()
        posted, verdict, wait_s, began = False, f"verdict/{key}", 2 * self.timeout_s + EXCHANGE_LOST_WAIT_S, time.monotonic()
        while True:
            if not posted and ended:
                self.store.set(f"ended/{key}/{self.box}", "failed" if "err" in ended else "ok")
                posted = True
            if self.box == 0:
                met = self._verdict(key, lost, watch, ended)
                if met is not None:
                    self.store.set(verdict, ",".join(map(str, met)))
                    # every box keeping on reads it before box 0 goes on (box 0 ending, the store would go with it)
                    _wait_for_boxes(self.store, {b: (f"read/{key}/{b}",) for b in met[1:]}, lost or dict, self._reported_lost,
                                    watch.deadline, lambda waiting: RuntimeError(f"box 0: box(es) {waiting} did not read the verdict on the exchange"))
                    return ended.get("out"), met
            elif self.store.check([verdict]):
                said = self.store.get(verdict).decode()
                if said.startswith("box 0:"):
                    raise RuntimeError(said)
                self.store.set(f"read/{key}/{self.box}", "")
                return ended.get("out"), tuple(int(b) for b in said.split(","))
            elif time.monotonic() - began > wait_s:
                raise RuntimeError(f"box {self.box}: box 0's leader gave no verdict on the exchange within {wait_s:.0f} s (box 0 lost?)")
            time.sleep(0.005)

    def _verdict(self, key: str, lost: Callable[[], dict[int, int]] | None, watch: _Watch, ended: dict) -> tuple[int, ...] | None:
        """Box 0's leader, during an exchange: the members, once every one's ring ended well; the members less those
        the driver reports lost, once it does (asked every LOST_POLL_S); None while neither. A ring that broke with no
        box reported lost within EXCHANGE_LOST_WAIT_S (at once where there is no driver to ask), or none ending within
        the link's timeout, is an error for every box: the job is placed again from its checkpoint."""
        said = {b: self.store.get(f"ended/{key}/{b}").decode() for b in self.members if self.store.check([f"ended/{key}/{b}"])}
        if len(said) == len(self.members) and "failed" not in said.values():
            return self.members
        now = time.monotonic()
        if lost is not None and now - watch.asked > LOST_POLL_S:
            watch.asked, reported = now, lost()
            gone = {b for b in self.members[1:] if self._reported_lost(b, reported)}
            if gone:
                return tuple(b for b in self.members if b not in gone)
        broke = sorted(b for b, how in said.items() if how == "failed")
        watch.broke_at = (watch.broke_at or now) if broke else None
        if broke and (lost is None or now - watch.broke_at > EXCHANGE_LOST_WAIT_S) or now > watch.deadline:
            error = (f"box 0: the exchange across boxes broke on box(es) {broke} ({ended.get('err', 'box 0 ended well')}) "
                     "and no box was reported lost" if broke else
                     f"box 0: the exchange across boxes did not end within {self.timeout_s:.0f} s and no box was reported lost")
            self.store.set(f"verdict/{key}", error)
            raise RuntimeError(error)
        return None

    def _reported_lost(self, box: int, reported: dict[int, int]) -> bool:
        """Box 0's leader: whether the driver's lost record names the life of `box` that box 0 knows (its first, or
        the one it last let in)."""
        return reported.get(box, -1) >= self.lives.get(box, 0)

    def send(self, tensor: torch.Tensor, box: int) -> None:
        """`tensor` to one box that met (box 0's leader hands the global state to a box let back in)."""
        me, to = self.members.index(self.box), self.members.index(box)
        _way(self.up, self.down, me, to).send([tensor], to, HANDOVER_TAG).wait()
        self.bytes_sent += tensor.numel() * tensor.element_size()

    def receive(self, tensor: torch.Tensor, box: int) -> torch.Tensor:
        """Into `tensor`, what `box` sends this one (`send`); returns it."""
        me, sender = self.members.index(self.box), self.members.index(box)
        _way(self.up, self.down, sender, me).recv([tensor], sender, HANDOVER_TAG).wait()
        return tensor


@dataclass
class _Watch:
    """Box 0's leader during one exchange across boxes."""

    deadline: float  # by when every ring should have ended (the link's timeout)
    asked: float = 0.0  # when it last asked the driver for boxes lost
    broke_at: float | None = None  # when it first saw a box's ring break


def _ring(tensor: torch.Tensor, box: int, members: tuple[int, ...], up, down) -> list[torch.Tensor]:
    """The ring all-gather of BoxLink.exchange, over the link's groups as they were when it began (a ring given up on
    stays on them)."""
    import torch

    k, me = len(members), members.index(box)
    out = [tensor if b == me else torch.empty_like(tensor) for b in range(k)]
    after, before = (me + 1) % k, (me - 1) % k
    for hop in range(k - 1):  # hop h: pass on what came from h boxes back, take what came from h + 1 back
        sent = _way(up, down, me, after).send([out[(me - hop) % k]], after, hop)
        taken = _way(up, down, before, me).recv([out[(me - hop - 1) % k]], before, hop)
        sent.wait()
        taken.wait()
    return out


def _way(up, down, sender: int, receiver: int):
    """The link's group for one direction: a box sends to a later box on `up`, to an earlier one on `down`."""
    return up if sender < receiver else down


LOST_POLL_S = 1.0  # how often box 0's leader asks whether a box it waits for was lost
# how long box 0's leader, a box's ring broken, waits for the driver to report a box lost (the driver does as soon as
# Ray reports the box's process dead) before the error stands
EXCHANGE_LOST_WAIT_S = 30.0
HANDOVER_TAG = 1 << 20  # gloo's tag for a handover to a box let back in (an exchange's hops are tagged 0, 1, ...)


def _wait_for_boxes(store, keys: dict[int, tuple[str, ...]], lost: Callable[[], dict[int, int]],
                    gone: Callable[[int, dict[int, int]], bool], deadline: float, late: Callable[[list[int]], Exception],
                    stop_at_loss: bool = False) -> tuple[set[int], dict[int, int]]:
    """Box 0's leader: until every box in `keys` has posted one of its keys in the store or is `gone` by the driver's
    lost record (`lost()`: each lost box and its life lost; asked every LOST_POLL_S, and once more when none is left
    to wait for, so a box lost after its key came is gone too). Past `deadline`, raises `late(the boxes waited for)`;
    `stop_at_loss`: returns at the first box gone. Returns the boxes gone and the driver's last record."""
    waiting, asked, reported = set(keys), 0.0, {}
    while keys:
        waiting = {b for b in waiting if not any(store.check([key]) for key in keys[b])}
        if time.monotonic() - asked > LOST_POLL_S or not waiting:
            reported, asked = lost(), time.monotonic()
            dead = {b for b in keys if gone(b, reported)}
            waiting -= dead
            if not waiting or (dead and stop_at_loss):
                return dead, reported
        if time.monotonic() > deadline:
            raise late(sorted(waiting))
        time.sleep(0.005)  # (store.wait with a short timeout would log a warning at every try)
    return set(), reported  # (no box to wait for)


def _wait_for_leaders(store, boxes: int, lost: Callable[[], dict[int, int]], timeout_s: float,
                      unmet: Callable[[Exception], RuntimeError]) -> None:
    """Box 0's leader at the start: until every other box's leader has connected to its store."""
    gone, _ = _wait_for_boxes(store, {b: (f"joined/{b}",) for b in range(1, boxes)}, lost, lambda b, reported: b in reported,
                              time.monotonic() + timeout_s, lambda waiting: unmet(TimeoutError(f"box(es) {waiting} never connected")),
                              stop_at_loss=True)
    if gone:
        raise RuntimeError(f"box 0: box(es) {sorted(gone)} lost before the boxes met, at the job's start")


def _gloo_pair(store, prefix: str, rank: int, size: int, timeout_s: float) -> tuple[object, object]:
    """The two gloo groups of the leaders' link (up, down), each under its own prefix in the store; none for a lone box."""
    from datetime import timedelta

    import torch.distributed as dist

    if size == 1:
        return None, None
    return tuple(dist.ProcessGroupGloo(dist.PrefixStore(f"{prefix}-{way}", store), rank, size, timedelta(seconds=timeout_s))
                 for way in ("up", "down"))

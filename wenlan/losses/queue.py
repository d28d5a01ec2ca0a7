"""The negative queues and the queue manager: momentum keys of past global batches.

Every optimizer step, each data-parallel rank's momentum keys are all-gathered (no gradient) and
written at a shared pointer, so all ranks agree on one global queue of ``size`` slots. Where that queue
lives depends on the mode:

- replicated: every rank holds all ``size`` slots (identical content everywhere);
- sharded: rank r of N holds the global slots [r*size/N, (r+1)*size/N) only, so a queue of a million
  keys costs each rank size/N slots; the loss then combines the ranks' partial softmax normalisers
  (see ``wenlan.losses.objective.queue_scores``).

Global key order within one step is [rank][micro-batch][sample]: the data pipeline gives rank r the
contiguous positions [r*G/W, (r+1)*G/W) of a global batch of G, so a 1-rank run with gradient
accumulation 2 writes exactly the queue of a 2-rank run.

The queue tensors are non-persistent buffers (they follow the module across devices but are not in its
state dict): a sharded queue differs per rank, which a rank-0 module file cannot hold. Checkpoints use
``state()``/``load_state()`` per rank and ``consolidate``/``shard`` to change the world size or mode.
"""

import torch
import torch.distributed as dist
import torch.nn as nn

from wenlan.losses.gather import all_gather_single


def _world(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


class KeyGather:
    """One optimizer step's momentum keys from every rank, gathered without gradient, overlapped.

    Per micro-batch ``add(image_keys, text_keys, ids)``; ``launch()`` once after the step's last
    forward and before its backward, so the all-gather runs while the backward computes; ``wait()``
    before the enqueue returns the global keys ``(image (G, E), text (G, E), ids (G,))`` in
    [rank][micro-batch][sample] order and readies the object for the next step. Every rank adds the
    same number of keys (the micro-batch is fixed).
    """

    def __init__(self, group=None):
        self.group = group
        self._parts = []  # this step's (image (B, E), text (B, E), ids (B,)) per micro-batch
        self._inputs = None  # what an in-flight collective may still read: kept alive until wait()
        self._pending = None

    def add(self, image_keys: torch.Tensor, text_keys: torch.Tensor, ids: torch.Tensor) -> None:
        if self._pending is not None:
            raise RuntimeError("KeyGather.add() after launch(): call wait() first")
        self._parts.append((image_keys.detach(), text_keys.detach(), ids.detach()))

    def clear(self) -> None:
        """Drop the keys added since the last ``wait()`` (forward passes whose keys are not enqueued)."""
        if self._pending is not None:
            raise RuntimeError("KeyGather.clear() after launch(): call wait() first")
        self._parts = []

    @torch.no_grad()
    def launch(self, async_op: bool = True) -> None:
        if not self._parts or self._pending is not None:
            raise RuntimeError("KeyGather.launch() needs add() since the last wait()")
        image, text, ids = (torch.cat(p) for p in zip(*self._parts))  # this rank's step, micro-batch order
        keys = torch.cat([image, text], dim=1)  # (M*B, 2E): one collective for both modalities
        world = _world(self.group)
        if world == 1:
            self._pending = (keys, ids, [])
            return
        # all_gather_single puts rank r's (M*B) rows at [r*M*B, (r+1)*M*B): [rank][micro][sample].
        all_keys = keys.new_empty((world * keys.shape[0], keys.shape[1]))  # (G, 2E)
        all_ids = ids.new_empty(world * ids.shape[0])  # (G,)
        works = [all_gather_single(all_keys, keys, group=self.group, async_op=async_op),  # no gradient
                 all_gather_single(all_ids, ids.contiguous(), group=self.group, async_op=async_op)]
        self._inputs = (keys, ids)
        self._pending = (all_keys, all_ids, [w for w in works if w is not None])

    @torch.no_grad()
    def wait(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._pending is None:
            raise RuntimeError("KeyGather.wait() without launch()")
        all_keys, all_ids, works = self._pending
        for work in works:
            work.wait()
        self._parts, self._inputs, self._pending = [], None, None
        E = all_keys.shape[1] // 2
        return all_keys[:, :E], all_keys[:, E:], all_ids  # (G, E), (G, E), (G,)


class KeyQueues(nn.Module):
    """Image-key and text-key queues of ``size`` global slots with a shared write pointer; this module
    holds shard ``shard`` of ``num_shards`` (the global slots [offset, offset + local_size)).

    ``ids`` tags each slot with the id of the sample it came from, so copies of a query's own positive
    can be masked out of its negatives. ``filled`` counts written slots until the queue is full once;
    since writes start at slot 0 the written slots are always [0, filled), and unfilled ones are never
    negatives (MoCo's random initial vectors would be noise). ``ptr`` and ``filled`` are the same on
    every rank and live on the host, so reading them costs no device synchronisation.
    """

    def __init__(self, size: int, dim: int, shard: int = 0, num_shards: int = 1):
        super().__init__()
        if size % num_shards or not 0 <= shard < num_shards:
            raise ValueError(f"a queue of {size} slots cannot be split into shard {shard} of {num_shards}")
        self.size, self.dim, self.shard, self.num_shards = size, dim, shard, num_shards
        self.local_size = size // num_shards
        self.offset = shard * self.local_size
        self.register_buffer("image", torch.zeros(self.local_size, dim), persistent=False)  # (K/N, E)
        self.register_buffer("text", torch.zeros(self.local_size, dim), persistent=False)  # (K/N, E)
        self.register_buffer("ids", torch.full((self.local_size,), -1, dtype=torch.long), persistent=False)
        self.ptr = 0
        self.filled = 0

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, shard={self.shard}/{self.num_shards}"

    def num_live(self) -> int:
        """How many of this shard's slots hold a key: they are its first ``num_live()``."""
        return min(max(self.filled - self.offset, 0), self.local_size)

    def live(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This shard's filled slots (views): image (n, E), text (n, E), ids (n,)."""
        n = self.num_live()
        return self.image[:n], self.text[:n], self.ids[:n]

    def valid(self) -> torch.Tensor:
        """(K/N,) True where this shard's slot holds a key."""
        return torch.arange(self.local_size, device=self.ids.device) < self.num_live()

    @torch.no_grad()
    def enqueue(self, image_keys: torch.Tensor, text_keys: torch.Tensor, ids: torch.Tensor) -> None:
        """Write the (G, E) global keys of a step at the pointer, wrapping around; the oldest slots are
        overwritten. Every rank passes the same keys; each writes the part that falls in its shard."""
        n = ids.shape[0]
        if n > self.size:
            raise ValueError(f"cannot enqueue {n} keys into a queue of {self.size}")
        lo_shard, hi_shard = self.offset, self.offset + self.local_size
        # Key i goes to global slot (ptr + i) % size: the window [ptr, ptr + n) and, past the end, its
        # wrapped part [ptr - size, ptr - size + n). Each slot is in exactly one of the two.
        for start in (self.ptr, self.ptr - self.size):
            lo, hi = max(start, lo_shard), min(start + n, hi_shard)
            if lo < hi:
                local, batch = slice(lo - lo_shard, hi - lo_shard), slice(lo - start, hi - start)
                self.image[local] = image_keys[batch].to(self.image.dtype)
                self.text[local] = text_keys[batch].to(self.text.dtype)
                self.ids[local] = ids[batch].to(self.ids.device)
        self.ptr = (self.ptr + n) % self.size
        self.filled = min(self.filled + n, self.size)

    def state(self) -> dict:
        """This shard for a checkpoint. The tensors are the live buffers (no copy): save them before
        the next enqueue."""
        return dict(image=self.image, text=self.text, ids=self.ids, ptr=self.ptr, filled=self.filled,
                    size=self.size, shard=self.shard, num_shards=self.num_shards)

    @torch.no_grad()
    def load_state(self, state: dict) -> None:
        """Load a state of this exact layout, or a global one (``num_shards=1``, e.g. from
        ``consolidate``), of which this module takes its shard."""
        if state["size"] != self.size or state["image"].shape[-1] != self.dim:
            raise ValueError(f"queue state has {state['size']} slots of dim {state['image'].shape[-1]}, this "
                             f"queue {self.size} of dim {self.dim}: --queue-size and the preset must match the "
                             "checkpoint")
        if (state["shard"], state["num_shards"]) != (self.shard, self.num_shards):
            if state["num_shards"] != 1:
                raise ValueError(f"queue state is shard {state['shard']} of {state['num_shards']}, this queue "
                                 f"shard {self.shard} of {self.num_shards}: consolidate() the shards first")
            state = shard(state, self.shard, self.num_shards)
        for name in ("image", "text", "ids"):
            getattr(self, name).copy_(state[name])
        self.ptr, self.filled = int(state["ptr"]), int(state["filled"])


def consolidate(shard_states: list[dict]) -> dict:
    """Per-shard states (one per shard, any order) -> the global state (``num_shards=1``)."""
    states = sorted(shard_states, key=lambda s: s["shard"])
    n = states[0]["num_shards"]
    if [s["shard"] for s in states] != list(range(n)) or any(s["num_shards"] != n for s in states):
        raise ValueError(f"need exactly one state per shard 0..{n - 1}, got shards "
                         f"{[(s['shard'], s['num_shards']) for s in shard_states]}")
    for key in ("ptr", "filled", "size"):
        if len({int(s[key]) for s in states}) != 1:
            raise ValueError(f"queue shards disagree on {key}: {[int(s[key]) for s in states]}")
    out = {k: torch.cat([s[k] for s in states]) for k in ("image", "text", "ids")}
    return dict(out, ptr=int(states[0]["ptr"]), filled=int(states[0]["filled"]), size=int(states[0]["size"]),
                shard=0, num_shards=1)


def shard(global_state: dict, index: int, num_shards: int) -> dict:
    """The global state's shard ``index`` of ``num_shards`` (contiguous split of the slots)."""
    size = int(global_state["size"])
    if global_state["num_shards"] != 1:
        raise ValueError("shard() takes a global state: consolidate() the shards first")
    if size % num_shards or not 0 <= index < num_shards:
        raise ValueError(f"a queue of {size} slots cannot be split into shard {index} of {num_shards}")
    part = slice(index * size // num_shards, (index + 1) * size // num_shards)
    # Copies, not views: torch.save of a view writes its whole storage, i.e. the global queue.
    return dict({k: global_state[k][part].clone() for k in ("image", "text", "ids")}, ptr=int(global_state["ptr"]),
                filled=int(global_state["filled"]), size=size, shard=index, num_shards=num_shards)

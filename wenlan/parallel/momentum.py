"""The momentum (EMA) update of the key towers, wherever the parameters live.

    key = m * key + (1 - m) * online        for every (online, key) parameter pair

ZeRO-0/1/2: whole tensors on every rank. ZeRO-3: each rank updates only its own partition of each key
parameter (``ds_tensor``) from its own partition of the online parameter's fp32 master (held by the
optimizer): no communication. Two ZeRO-3 details:

- Parameters small enough to stay whole (``stage3_param_persistence_threshold``) are used from their
  whole copy, which an edit of ``ds_tensor`` does not reach: after the update they are re-gathered
  from their partitions, exactly as DeepSpeed re-gathers the online ones after every optimizer step.
- With bf16/fp16 weights an EMA step of (1 - m) = 1e-3 is below the weight's resolution and rounds
  away, so each key partition has an fp32 master that carries the EMA; the weight is its rounding.

A frozen online parameter (BriVL-1.0's frozen backbone blocks) has no optimizer master; its own
partition is the source. ``update(0.0)`` copies online into key, which is how the key towers start.
"""

import torch


def zero3_partition(whole: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 partition of a whole tensor, shaped and placed like ``local`` (its flat
    partition): rank r holds [r * P, (r + 1) * P) of the flattened tensor, zero-padded at the end."""
    import torch.distributed as dist

    flat = whole.reshape(-1).float()
    start = dist.get_rank() * local.numel()
    part = torch.zeros(local.numel())
    piece = flat[start:start + local.numel()]
    part[:piece.numel()] = piece
    return part.to(local.device)


def _is_zero3(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


class MomentumEMA:
    """fp32 EMA of key parameters from online parameters, partition-local under ZeRO-3.

    One step is a few multi-tensor kernels over all pairs (``torch._foreach_*``), not a Python loop
    of small kernels per parameter: the 1b preset has ~900 key parameters. Under ZeRO-3 the sources are
    views of the optimizer's flat fp32 partitions, looked up once (DeepSpeed's per-parameter accessor
    costs a dictionary walk per call); where the accessor returns a copy instead (optimizer offload to
    another device) they are read afresh every step."""

    def __init__(self, named_pairs: list[tuple[str, torch.nn.Parameter, torch.nn.Parameter]]):
        """named_pairs: (key parameter name, online parameter, key parameter), in a fixed order."""
        self.names = [name for name, _, _ in named_pairs]
        self.pairs = [(online, key) for _, online, key in named_pairs]
        self.zero3 = bool(self.pairs) and _is_zero3(self.pairs[0][1])
        # fp32 masters only where the key weights are low precision; fp32 weights are their own master.
        self.masters = [self._local(key).detach().float().clone() if self._local(key).dtype != torch.float32 else None
                        for _, key in self.pairs]
        self.persistent = [key for _, key in self.pairs if getattr(key, "ds_persist", False)]
        self._sources: list[torch.Tensor] | None = None

    def _local(self, param: torch.Tensor) -> torch.Tensor:
        """This rank's storage of a parameter: its ZeRO-3 partition (flat), else the whole tensor."""
        return param.ds_tensor if self.zero3 else param.data

    def _online_fp32(self, online: torch.nn.Parameter) -> torch.Tensor:
        """This rank's part of the online parameter, from the fp32 master when the optimizer has one."""
        if self.zero3 and online.requires_grad:
            from deepspeed.utils import safe_get_local_fp32_param

            return safe_get_local_fp32_param(online)  # (partition numel,), fp32
        # ZeRO-0/1/2 keep the fp32 master partitioned by flat ranges that cut through tensors; reading it
        # whole would need a gather per step, so the EMA reads the (whole) working copy of the weight.
        return self._local(online)

    def _source_views(self) -> list[torch.Tensor]:
        """Flat views of what each key follows (``_online_fp32``), kept while they stay the same memory."""
        if self._sources is not None:
            return self._sources
        sources = [self._online_fp32(online).view(-1) for online, _ in self.pairs]
        again = [self._online_fp32(online) for online, _ in self.pairs]
        if all(a.data_ptr() == b.data_ptr() for a, b in zip(sources, again)):
            self._sources = sources  # views of the live tensors: valid for the run
        return sources

    @torch.no_grad()
    def update(self, m: float) -> None:
        if not self.pairs:
            return
        sources = self._source_views()
        targets = [self._local(key).view(-1) for _, key in self.pairs]
        # What carries the EMA: the fp32 master where the key is low precision, else the key itself.
        carriers = [master.view(-1) if master is not None else target for master, target in zip(self.masters, targets)]
        # One dtype and device per pair: bf16 sources (ZeRO-0/1/2 working copies) of fp32 masters are
        # promoted, and with the optimizer offloaded the online fp32 masters sit in host memory while the
        # keys' partitions stay on the device (one host-to-device copy of this rank's partitions per step).
        matched = [s if (s.dtype, s.device) == (c.dtype, c.device) else s.to(device=c.device, dtype=c.dtype)
                   for s, c in zip(sources, carriers)]
        if m == 0.0:  # a copy: the key may be uninitialised memory, and NaN * 0 is NaN
            torch._foreach_copy_(carriers, matched)
        else:
            # m c + (1 - m) s as two passes rather than one lerp: the same roundings as the per-tensor
            # update this replaced, so runs keep their results bit for bit.
            torch._foreach_mul_(carriers, m)
            torch._foreach_add_(carriers, matched, alpha=1.0 - m)
        low = [(t, c) for t, c, master in zip(targets, carriers, self.masters) if master is not None]
        if low:
            torch._foreach_copy_([t for t, _ in low], [c for _, c in low])  # the weight is the master's rounding
        self._regather_persistent()

    def _regather_persistent(self) -> None:
        """Whole copies are what forward reads: rebuild them from the updated partitions with one
        all-gather of all of them, flattened (weights only, no gradient). DeepSpeed's own
        partition() + all_gather() of the list costs a collective per parameter: ~95% of the update
        on the 47M bench model (bench/momentum_update.py), for tensors of a few thousand elements."""
        if not self.persistent:
            return
        import torch.distributed as dist
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        from wenlan.losses.gather import all_gather_single

        if any(key.ds_status != ZeroParamStatus.AVAILABLE for key in self.persistent):
            # Not gathered yet (before the first forward): DeepSpeed's path, which also sets their status.
            self.persistent[0].partition(self.persistent)
            self.persistent[0].all_gather(self.persistent)
            return

        group = self.persistent[0].ds_process_group
        world = dist.get_world_size(group)
        parts = [key.ds_tensor.view(-1) for key in self.persistent]  # this rank's [r*P, (r+1)*P) of each
        local = torch.cat(parts)  # (sum P,)
        gathered = local.new_empty(world * local.numel())
        all_gather_single(gathered, local, group=group)  # no gradient
        gathered = gathered.view(world, -1)  # (world, sum P): rank r's partitions in row r
        offset = 0
        for key, part in zip(self.persistent, parts):
            whole = gathered[:, offset:offset + part.numel()].reshape(-1)[:key.ds_numel]  # drops the padding
            key.data.copy_(whole.view(key.ds_shape))
            offset += part.numel()

    @torch.no_grad()
    def load_whole(self, read) -> None:
        """Key weights and fp32 masters from whole fp32 tensors (a converted checkpoint), each rank
        reading only its own partition under ZeRO-3: ``read(name, start, numel)`` returns elements
        [start, start + numel) of the flattened tensor in fp32, zero-padded past its end."""
        import torch.distributed as dist

        for name, (_, key), master in zip(self.names, self.pairs, self.masters):
            local = self._local(key).view(-1)
            start = dist.get_rank() * local.numel() if self.zero3 else 0  # zero3_partition's layout
            part = read(name, start, local.numel()).to(local.device)
            local.copy_(part.to(local.dtype))
            if master is not None:
                master.view(-1).copy_(part)
        self._regather_persistent()

    def state_dict(self) -> dict:
        """This rank's fp32 masters (ZeRO-3: its partitions; else whole tensors), by key parameter name."""
        return {name: master.cpu() for name, master in zip(self.names, self.masters) if master is not None}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for name, master in zip(self.names, self.masters):
            if master is not None:
                if name not in state:
                    raise KeyError(f"checkpoint has no fp32 momentum master for {name}")
                master.copy_(state[name].view_as(master))

"""What a rank's DeepSpeed engine really holds for model states, in the memory model's terms, so every job
reports it beside the plan's estimate (and a test holds the two within 5%).

Counted from the engine's own tensors, by size (what exists, not what an allocator reserved):
  weights    the module's parameters this rank keeps: all of them, or its ZeRO-3 partition (with the
             small parameters ZeRO-3 keeps whole on every rank)
  gradients  the 16-bit gradient partition ZeRO-1/2 reduce into (the full gradients at ZeRO-1)
  optimizer  the fp32 master partition, its fp32 gradient (as large as the partition; DeepSpeed creates it
             for the step) and the optimizer's state tensors
"""

from __future__ import annotations


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def model_state_bytes(engine) -> dict[str, int]:
    import torch

    opt = engine.optimizer
    stage = engine.zero_optimization_stage()
    mixed = engine.bfloat16_enabled() or engine.fp16_enabled()
    params = list(engine.module.parameters())
    if stage == 3:
        weights = _nbytes(p.ds_tensor for p in params if hasattr(p, "ds_tensor"))
        masters = list(opt.fp32_partitioned_groups_flat)
        buffer = opt.grad_partitions_flat_buffer  # the gradient partition, in the accumulation dtype
        gradients = _nbytes([buffer]) if not mixed or buffer.dtype != torch.float32 else 0
    elif stage in (1, 2):
        weights = _nbytes(params)
        masters = list(opt.single_partition_of_fp32_groups)
        partition = sum(m.numel() for m in masters)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        gradients = (partition if stage == 2 else trainable) * next(p for p in params if p.requires_grad).element_size()
    else:
        raise ValueError("the memory report covers ZeRO stages 1 to 3")
    states = [t for state in opt.optimizer.state.values() for t in state.values() if torch.is_tensor(t) and t.dim() > 0]
    # Mixed precision adds the fp32 gradient of the master partition: the ZeRO-3 accumulation buffer when it
    # is fp32, else the copy DeepSpeed makes for the step. In fp32 training it is the gradient partition itself.
    fp32_grad = _nbytes(masters) if mixed else 0
    return {"weights": weights, "gradients": gradients, "optimizer": _nbytes(masters) + fp32_grad + _nbytes(states)}

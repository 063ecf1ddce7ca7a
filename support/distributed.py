"""Several processes: `torchrun --nproc_per_node N train.py ...`.

Each process holds the whole frozen model and a copy of the head, whose gradients
DistributedDataParallel averages (gloo on CPUs, NCCL on GPUs). --batch-size is per process: an
optimiser step sees batch-size × grad-accum × processes pairs, and gives what one process with
that batch gives. Only rank 0 prints, evaluates, writes metrics and checkpoints.
"""
import os
import sys

import torch
import torch.distributed as dist


def start_processes(device):
    """(rank, world size, device) of this process. torchrun sets RANK, WORLD_SIZE and LOCAL_RANK;
    each process holds the whole frozen model and a copy of the head, whose gradients DDP averages."""
    if "RANK" not in os.environ:
        return 0, 1, device
    use_gpu = torch.cuda.is_available() and device != "cpu"
    dist.init_process_group("nccl" if use_gpu else "gloo")
    if use_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if dist.get_rank() > 0:
        sys.stdout = open(os.devnull, "w")  # only rank 0 prints, writes metrics and saves
    return dist.get_rank(), dist.get_world_size(), f"cuda:{os.environ['LOCAL_RANK']}" if use_gpu else "cpu"


def global_batches(n_pairs, args, world, epoch):
    """The epoch's batches of pair indices, batch_size x world pairs each, in an order fixed by the
    seed and the epoch (so a resumed run sees what the uninterrupted one would). Each process takes
    its share of every batch (`my_share`); a last batch with fewer pairs than processes is dropped."""
    order = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
    size = args.batch_size * world
    batches = [order[i:i + size] for i in range(0, n_pairs, size)]
    if world > 1 and len(batches[-1]) < world:
        batches.pop()
    return batches


def my_share(batch, rank, world):
    return batch.tensor_split(world)[rank].tolist()


def all_reduce_sum(values, world):
    """{name: float} summed over the processes (a no-op with one). NCCL reduces GPU tensors only, so
    the numbers travel on this process's GPU there, and on the CPU with gloo."""
    if world == 1:
        return values
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))



def barrier(world):
    """Every process waits here for the others (a no-op with one)."""
    if world > 1:
        dist.barrier()


def finish(world):
    if world > 1:
        dist.destroy_process_group()

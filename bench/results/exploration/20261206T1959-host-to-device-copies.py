"""Host-to-device copies from pageable host memory: one model-sized set of tensors alone, two at once on two
threads with a CUDA stream each (what the text encoder's move beside the other weights' did), and one after
the other. Run AY's log is beside this file: `python3 20261206T1959-host-to-device-copies.py`."""

import threading
import time

import torch

GIB = 1 << 30
EACH_MIB = 48  # about one of klein-4B's larger weight matrices
SET_GIB = 7.5  # about the transformer's bytes in bf16, and about the cut text encoder's


def host_tensors(total_gib: float) -> list[torch.Tensor]:
    count = int(total_gib * GIB / (EACH_MIB << 20))
    return [torch.empty((EACH_MIB << 20) // 2, dtype=torch.bfloat16).fill_(1.0) for _ in range(count)]


def move(
    tensors: list[torch.Tensor],
    finished: dict[str, float],
    key: str,
    started: float,
    stream: torch.cuda.Stream | None = None,
) -> None:
    """Copy ``tensors`` to the GPU and record when the last byte arrived, seconds after ``started``."""
    if stream is None:
        copies = [tensor.to("cuda") for tensor in tensors]
        torch.cuda.synchronize()
    else:
        torch.cuda.set_device(0)
        with torch.cuda.stream(stream):
            copies = [tensor.to("cuda") for tensor in tensors]
        stream.synchronize()
    finished[key] = time.perf_counter() - started
    del copies


def main() -> None:
    torch.empty(1, device="cuda")
    first, second = host_tensors(SET_GIB), host_tensors(SET_GIB)
    print("host tensors ready", flush=True)
    for trial in range(3):
        done: dict[str, float] = {}
        move(first, done, "a", time.perf_counter())
        torch.cuda.empty_cache()
        print(f"trial {trial}: A alone 7.5 GB {done['a']:.2f} s ({SET_GIB / done['a']:.1f} GB/s)", flush=True)

        done = {}
        move(second, done, "b", time.perf_counter(), torch.cuda.Stream())
        torch.cuda.empty_cache()
        print(f"trial {trial}: B alone on its own stream {done['b']:.2f} s", flush=True)

        done = {}
        started = time.perf_counter()
        beside = threading.Thread(target=move, args=(second, done, "b", started, torch.cuda.Stream()))
        beside.start()
        move(first, done, "a", started)
        beside.join()
        torch.cuda.empty_cache()
        rate = 2 * SET_GIB / max(done.values())
        print(
            f"trial {trial}: together: A done {done['a']:.2f} s, B done {done['b']:.2f} s"
            f" (15 GB, {rate:.1f} GB/s)",
            flush=True,
        )

        done = {}
        started = time.perf_counter()
        move(first, done, "a", started)
        move(second, done, "b", started, torch.cuda.Stream())
        torch.cuda.empty_cache()
        print(
            f"trial {trial}: one after the other: A done {done['a']:.2f} s, B done {done['b']:.2f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()

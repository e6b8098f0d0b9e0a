"""Host-to-device copies of pageable host memory: one model-sized set of tensors alone, and two at once on
two threads with a CUDA stream each (what TextEncoderMove does beside the transformer's move)."""
import threading, time, torch

GB = 1 << 30
def tensors(total_gb: float, each_mb: int = 48) -> list[torch.Tensor]:
    n = int(total_gb * GB / (each_mb << 20))
    return [torch.empty((each_mb << 20) // 2, dtype=torch.bfloat16).fill_(1.0) for _ in range(n)]

def move(ts, out, key, t0, stream=None):
    if stream is not None:
        torch.cuda.set_device(0)
        with torch.cuda.stream(stream):
            r = [t.to("cuda") for t in ts]
        stream.synchronize()
    else:
        r = [t.to("cuda") for t in ts]
        torch.cuda.synchronize()
    out[key] = time.perf_counter() - t0
    del r

torch.cuda.init(); torch.empty(1, device="cuda")
a = tensors(7.5); b = tensors(7.5)
print("host tensors ready", flush=True)
for trial in range(3):
    out = {}
    t0 = time.perf_counter(); move(a, out, "a", t0); torch.cuda.empty_cache()
    print(f"trial {trial}: A alone 7.5 GB {out['a']:.2f} s ({7.5/out['a']:.1f} GB/s)", flush=True)
    out = {}
    t0 = time.perf_counter(); move(b, out, "b", t0, torch.cuda.Stream()); torch.cuda.empty_cache()
    print(f"trial {trial}: B alone on its own stream {out['b']:.2f} s", flush=True)
    out = {}
    t0 = time.perf_counter()
    th = threading.Thread(target=move, args=(b, out, "b", t0, torch.cuda.Stream()))
    th.start(); move(a, out, "a", t0); th.join(); torch.cuda.empty_cache()
    print(f"trial {trial}: together: A done {out['a']:.2f} s, B done {out['b']:.2f} s (15 GB, {15/max(out.values()):.1f} GB/s)", flush=True)
    out = {}
    t0 = time.perf_counter(); move(a, out, "a", t0); move(b, out, "b", t0, torch.cuda.Stream()); torch.cuda.empty_cache()
    print(f"trial {trial}: one after the other: A done {out['a']:.2f} s, B done {out['b']:.2f} s", flush=True)

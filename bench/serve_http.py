#!/usr/bin/env python
"""HTTP serving benchmark: `onnxmod serve` under concurrent load, with and without dynamic batching.

    python bench/serve_http.py                       # composed sample ResNet8 -> bench/results/serve_http.json
    python bench/serve_http.py --data ../shared/data # + a composed pretrained ResNet20 (export, decompose, compose)
    python bench/serve_http.py --smoke               # tiny: 4 clients x 10 requests, results in a temp dir

For each model and each server setting (dynamic batching: ``--max-batch 64 --max-delay-ms 2``;
unbatched: ``--max-batch 1 --max-delay-ms 0``) a fresh ``onnxmod serve`` process is started on a
free loopback port; ``--clients`` threads, each with its own ``tritonclient.http`` client, send
``--requests`` infer requests of one image each (binary tensors), one at a time, after a short
warm-up. Recorded: errors (HTTP failures and labels that differ from a direct onnxruntime run
of the same image), latency p50/p99, throughput (requests / wall time). The ceiling is the same
images run in one local onnxruntime batch, in this process, on the same device. Loopback only;
every loop is bounded in count and by ``--timeout-s``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_graphs"
RESULTS = REPO / "bench" / "results"
SETTINGS = {"dynamic_batching": {"max_batch": 64, "max_delay_ms": 2.0},
            "unbatched": {"max_batch": 1, "max_delay_ms": 0.0}}


def log(msg: str) -> None:
    print(f"[serve_http] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- models
def onnxmod_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "onnxmod.cli.main", *args, "--quiet"], check=True,
                   stdout=subprocess.DEVNULL)


def composed_resnet8(work: Path) -> Path:
    mods, out = work / "r8.modules", work / "resnet8_composed.onnx"
    onnxmod_cli("decompose", str(SAMPLES / "resnet8_cifar10.onnx"), "--calib", str(SAMPLES / "cifar10_calib.npz"),
                "-o", str(mods), "--device", "cpu", "--no-repair")  # serving speed depends on the graph, not on repair
    onnxmod_cli("compose", str(mods), "-o", str(out))
    return out


def composed_resnet20(work: Path, data: Path) -> Path:
    src, mods, out = work / "resnet20.onnx", work / "r20.modules", work / "resnet20_composed.onnx"
    onnxmod_cli("export", "resnet20", "--weights", str(data / "pretrained" / "resnet20-cifar10jpeg.th"), "-o", str(src))
    onnxmod_cli("decompose", str(src), "--calib", str(data / "cifar10"), "-o", str(mods), "--device", "cpu",
                "--no-repair")
    onnxmod_cli("compose", str(mods), "-o", str(out))
    return out


def test_images(n: int) -> np.ndarray:
    from onnxmod.data import open_dataset

    ds = open_dataset(SAMPLES / "cifar10_test.npz")
    x = np.concatenate([b for b, _ in ds.iter_batches(batch_size=256)])
    return np.ascontiguousarray(np.resize(x, (n, *x.shape[1:])), dtype=np.float32)  # cycles when n > len(ds)


# --------------------------------------------------------------------------- server
class Server:
    """`onnxmod serve MODEL --port 0` in a subprocess; ``host`` is its host:port once it listens."""

    def __init__(self, model: Path, max_batch: int, max_delay_ms: float, device: str, timeout_s: float,
                 instances: int, threads: int | None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "onnxmod.cli.main", "serve", str(model), "--name", "m", "--port", "0",
             "--device", device, "--max-batch", str(max_batch), "--max-delay-ms", str(max_delay_ms),
             "--instances", str(instances), *(["--threads", str(threads)] if threads else [])],
            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.host = self._wait_listening(timeout_s)

    def _wait_listening(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        seen = []
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            if "listening on http://" in line:
                return line.split("listening on http://")[1].split()[0]
        self.stop()
        raise RuntimeError("onnxmod serve did not start:\n" + "".join(seen))

    def stats(self) -> dict[str, Any]:
        import tritonclient.http as triton

        c = triton.InferenceServerClient(self.host)
        try:
            return c.get_inference_statistics("m")["model_stats"][0]
        finally:
            c.close()

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# --------------------------------------------------------------------------- load
def _client_loop(host: str, x: np.ndarray, expect: np.ndarray, idx: range, deadline: float,
                 lat: list[float], errors: list[str]) -> None:
    import tritonclient.http as triton

    c = triton.InferenceServerClient(host, connection_timeout=60, network_timeout=60)
    try:
        for i in idx:
            if time.monotonic() > deadline:
                errors.append("timeout: run stopped at --timeout-s")
                return
            inp = triton.InferInput("input", [1, *x.shape[1:]], "FP32")
            inp.set_data_from_numpy(x[i:i + 1])
            t = time.perf_counter()
            try:
                r = c.infer("m", [inp], outputs=[triton.InferRequestedOutput("label")])
                label = int(r.as_numpy("label")[0])
            except Exception as e:  # counted, reported
                errors.append(f"{type(e).__name__}: {e}")
                continue
            lat.append(time.perf_counter() - t)
            if label != int(expect[i]):
                errors.append(f"image {i}: label {label}, direct onnxruntime says {int(expect[i])}")
    finally:
        c.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_test(host: str, x: np.ndarray, expect: np.ndarray, clients: int, requests: int, timeout_s: float,
              warmup: int, server_pid: int) -> dict[str, Any]:
    """``clients`` threads x ``requests`` one-image requests; client i sends images i*requests .. (i+1)*requests-1."""
    warm_lat: list[float] = []
    warm_err: list[str] = []
    n = clients * requests  # warm-up images come after the measured ones
    warm = [threading.Thread(target=_client_loop, args=(host, x, expect, range(n + i * warmup, n + (i + 1) * warmup),
                                                        time.monotonic() + timeout_s, warm_lat, warm_err))
            for i in range(clients)]
    for t in warm:
        t.start()
    for t in warm:
        t.join()
    lats: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    deadline = time.monotonic() + timeout_s
    threads = [threading.Thread(target=_client_loop, args=(host, x, expect, range(i * requests, (i + 1) * requests),
                                                           deadline, lats[i], errors)) for i in range(clients)]
    cpu0 = (cpu_seconds(server_pid), cpu_seconds(os.getpid()))
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = (cpu_seconds(server_pid) - cpu0[0], cpu_seconds(os.getpid()) - cpu0[1])
    lat_ms = np.array([v for lst in lats for v in lst]) * 1000
    return {
        "requests": clients * requests, "completed": int(lat_ms.size), "errors": len(errors) + len(warm_err),
        "error_examples": (warm_err + errors)[:5], "wall_s": wall,
        # where the machine's cores went during the run: the server process and this (client) process
        "cpu_ms_per_request": {"server": 1000 * cpu[0] / max(lat_ms.size, 1), "client": 1000 * cpu[1] / max(lat_ms.size, 1)},
        "throughput_rps": lat_ms.size / wall,
        "latency_ms": {"p50": float(np.percentile(lat_ms, 50)), "p99": float(np.percentile(lat_ms, 99)),
                       "mean": float(lat_ms.mean()), "max": float(lat_ms.max())} if lat_ms.size else None,
    }


def batch_summary(stats: dict[str, Any]) -> dict[str, Any]:
    runs = {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}
    n_runs = sum(runs.values())
    return {"ort_runs": n_runs, "images": stats["inference_count"],
            "mean_batch": stats["inference_count"] / n_runs if n_runs else None,
            "max_batch_seen": max(runs) if runs else None}


def ceiling(model: Path, x: np.ndarray, device: str, repeats: int, max_batch: int) -> dict[str, Any]:
    """The same images run locally, no HTTP: in one onnxruntime batch (the ceiling), and in runs of ``max_batch``
    (what the batching server does at best). Best of ``repeats`` after a warm-up; the server's session settings."""
    from onnxmod import runtime
    from onnxmod.serve.model import SESSION_CONFIG

    sess = runtime.make_session(model, device=device, config=SESSION_CONFIG)
    runtime.run(sess, x[:max_batch])

    def best(batch: int) -> tuple[float, float]:
        """(images/s, CPU ms per image) of the fastest repeat."""
        runs = []
        for _ in range(repeats):
            t, c = time.perf_counter(), cpu_seconds(os.getpid())
            for i in range(0, len(x), batch):
                runtime.run(sess, x[i:i + batch])
            runs.append((time.perf_counter() - t, cpu_seconds(os.getpid()) - c))
        wall, cpu = min(runs)
        return len(x) / wall, 1000 * cpu / len(x)

    one, one_cpu = best(len(x))
    runs, runs_cpu = best(max_batch)
    return {"images": len(x), "device": runtime.session_device(sess), "throughput_ips": one,
            "cpu_ms_per_image": one_cpu, "runs_of_max_batch_ips": runs, "runs_of_max_batch_cpu_ms_per_image": runs_cpu,
            "max_batch": max_batch}


def _median(xs: list[float]) -> float:
    return float(np.median(xs))


def measure_model(name: str, model: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``args.rounds`` rounds, each: every server setting then the ceiling (interleaved against drifting load)."""
    from onnxmod import runtime

    n = args.clients * args.requests
    x = test_images(n + args.clients * args.warmup)
    expect = runtime.run(runtime.make_session(model, device=args.device), x, ["label"])[0]
    rounds: list[dict[str, Any]] = []
    for k in range(args.rounds):
        rnd: dict[str, Any] = {}
        # alternate the order from round to round: other jobs' load drifts, and a fixed order would bias one side
        for setting in (args.settings if k % 2 == 0 else args.settings[::-1]):
            cfg = SETTINGS[setting]
            log(f"{name} round {k + 1}/{args.rounds}: {setting} (max batch {cfg['max_batch']}, max delay "
                f"{cfg['max_delay_ms']} ms), {args.clients} clients x {args.requests} requests")
            server = Server(model, cfg["max_batch"], cfg["max_delay_ms"], args.device, args.timeout_s, args.instances,
                            args.threads)
            try:
                r = load_test(server.host, x, expect, args.clients, args.requests, args.timeout_s, args.warmup,
                              server.proc.pid)
                r["server"] = {**cfg, **batch_summary(server.stats())}
            finally:
                code = server.stop()
            r["server"]["exit_code"] = code
            lat = r["latency_ms"] or {"p50": float("nan"), "p99": float("nan")}
            log(f"  {r['throughput_rps']:.0f} req/s, p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms, "
                f"errors {r['errors']}, mean batch {r['server']['mean_batch'] or 0:.1f}, CPU ms/request: server "
                f"{r['cpu_ms_per_request']['server']:.2f}, client {r['cpu_ms_per_request']['client']:.2f}")
            rnd[setting] = r
        rnd["ceiling"] = ceiling(model, x[:n], args.device, args.repeats, SETTINGS["dynamic_batching"]["max_batch"])
        log(f"  ceiling: {rnd['ceiling']['throughput_ips']:.0f} images/s in one batch of {n} "
            f"({rnd['ceiling']['cpu_ms_per_image']:.2f} CPU ms/image), "
            f"{rnd['ceiling']['runs_of_max_batch_ips']:.0f} in runs of {rnd['ceiling']['max_batch']}")
        rounds.append(rnd)
    out: dict[str, Any] = {"model": model.name, "images_per_round": n, "rounds": rounds, "median": {}}
    for setting in args.settings:
        out["median"][setting] = {
            "throughput_rps": _median([r[setting]["throughput_rps"] for r in rounds]),
            "p50_ms": _median([r[setting]["latency_ms"]["p50"] for r in rounds if r[setting]["latency_ms"]]),
            "p99_ms": _median([r[setting]["latency_ms"]["p99"] for r in rounds if r[setting]["latency_ms"]]),
            "errors": sum(r[setting]["errors"] for r in rounds),
            "mean_batch": _median([r[setting]["server"]["mean_batch"] or 0 for r in rounds]),
            "server_cpu_ms_per_request": _median([r[setting]["cpu_ms_per_request"]["server"] for r in rounds]),
            "client_cpu_ms_per_request": _median([r[setting]["cpu_ms_per_request"]["client"] for r in rounds]),
        }
    out["median"]["ceiling_ips"] = _median([r["ceiling"]["throughput_ips"] for r in rounds])
    out["median"]["local_runs_of_max_batch_ips"] = _median([r["ceiling"]["runs_of_max_batch_ips"] for r in rounds])
    out["median"]["ceiling_cpu_ms_per_image"] = _median([r["ceiling"]["cpu_ms_per_image"] for r in rounds])
    if {"dynamic_batching", "unbatched"} <= set(args.settings):
        # per round (same load conditions), then the median over rounds
        b_over_u = [r["dynamic_batching"]["throughput_rps"] / r["unbatched"]["throughput_rps"] for r in rounds]
        c_over_b = [r["ceiling"]["throughput_ips"] / r["dynamic_batching"]["throughput_rps"] for r in rounds]
        med = out["median"]
        out["ratios"] = {"batched_over_unbatched": _median(b_over_u), "ceiling_over_batched": _median(c_over_b),
                         "per_round": {"batched_over_unbatched": b_over_u, "ceiling_over_batched": c_over_b},
                         # CPU time per image is far less sensitive to other jobs on a shared machine than wall time
                         "cpu": {"unbatched_over_batched_server": med["unbatched"]["server_cpu_ms_per_request"]
                                 / med["dynamic_batching"]["server_cpu_ms_per_request"],
                                 "batched_server_over_ceiling": med["dynamic_batching"]["server_cpu_ms_per_request"]
                                 / med["ceiling_cpu_ms_per_image"]}}
        out["goals"] = {"batched_ge_3x_unbatched": out["ratios"]["batched_over_unbatched"] >= 3,
                        "batched_within_2x_of_ceiling": out["ratios"]["ceiling_over_batched"] <= 2,
                        "zero_errors": all(out["median"][s]["errors"] == 0 for s in args.settings)}
    return out


def http_stack() -> dict[str, str | None]:
    """Versions of the serving stack (uvicorn picks uvloop and httptools when they are installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for pkg in ("starlette", "uvicorn", "uvloop", "httptools", "tritonclient"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def machine(command: str, mode: str, device: str) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "bench"))
    from run import machine_info  # one definition of the machine record for every bench

    return machine_info(SimpleNamespace(mode=mode, command=command, device=device))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, action="append", default=None,
                    help="model(s) to serve (default: the composed sample ResNet8, built here)")
    ap.add_argument("--data", type=Path, default=None, help="shared data dir: also a composed pretrained ResNet20")
    ap.add_argument("--smoke", action="store_true", help="4 clients x 10 requests on the sample model, temp output")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=200, help="requests per client, one image each")
    ap.add_argument("--warmup", type=int, default=5, help="requests per client before measuring")
    ap.add_argument("--repeats", type=int, default=3, help="ceiling: timed runs of the one-batch pass per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every setting + ceiling; medians reported")
    ap.add_argument("--instances", type=int, default=2, help="serve --instances, the same for every setting")
    ap.add_argument("--threads", type=int, default=None, help="serve --threads (default: serve's own)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated: {', '.join(SETTINGS)}")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="bound on each load run")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: bench/results/serve_http.json; "
                                                          "--smoke: a temp dir)")
    args = ap.parse_args(argv)
    args.settings = [s for s in args.settings.split(",") if s]
    if unknown := set(args.settings) - set(SETTINGS):
        ap.error(f"unknown settings {sorted(unknown)}")
    if args.smoke:
        args.clients, args.requests, args.warmup, args.repeats, args.rounds = 4, 10, 1, 1, 1
    command = "python bench/serve_http.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="serve_http.") as tmp:
        work = Path(tmp)
        models = {p.stem: p for p in args.model} if args.model else {"resnet8_composed": composed_resnet8(work)}
        if args.data is not None and not args.smoke:
            models["resnet20_composed"] = composed_resnet20(work, args.data)
        results = {"machine": machine(command.strip(), "smoke" if args.smoke else "full", args.device),
                   "settings": {"clients": args.clients, "requests_per_client": args.requests,
                                "warmup_per_client": args.warmup, "rounds": args.rounds, "device": args.device,
                                "instances": args.instances, "threads": args.threads,
                                "servers": SETTINGS, "http_stack": http_stack(),
                                "client": "tritonclient.http, one client per thread, binary tensors, "
                                          "one request in flight per client", "images": "sample_graphs/cifar10_test.npz"},
                   "models": {name: measure_model(name, path, args) for name, path in models.items()}}
        results["machine"]["total_s"] = time.perf_counter() - t0
        results["machine"]["loadavg_end"] = list(os.getloadavg())
        out = args.out or ((work / "serve_http.json") if args.smoke else RESULTS / "serve_http.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        log(f"wrote {out}")
    errors = sum(m["median"][s]["errors"] for m in results["models"].values() for s in args.settings)
    if errors:
        log(f"{errors} errors")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

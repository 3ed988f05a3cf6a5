#!/usr/bin/env python
"""HTTP serving benchmark: `onnxmod serve` under concurrent load, with and without dynamic batching.

    python bench/serve_http.py                       # composed sample ResNet8 -> bench/results/serve_http.json
    python bench/serve_http.py --data ../shared/data # + a composed pretrained ResNet20 (export, decompose, compose)
    python bench/serve_http.py --smoke               # tiny: 4 clients x 10 requests, results in a temp dir

For each model and each server setting (``--settings``; dynamic batching, serve's defaults:
``--max-batch 64 --max-delay-ms 2``; unbatched: ``--max-batch 1 --max-delay-ms 0``; optionally
dynamic batching without a delay) a fresh ``onnxmod serve`` process is started on a free loopback
port with the same ``--instances``/``--threads``; ``--clients`` clients, each a thread with its own
``tritonclient.http`` client, spread over ``--client-procs`` processes (one Python process would cap
the load on a many-core machine), send ``--requests`` infer requests of one image each (binary
tensors), one at a time, after a short warm-up. Recorded: errors (HTTP failures and labels that
differ from a direct onnxruntime run of the same image), unanswered requests, latency p50/p99,
throughput (requests / wall time), CPU per request of server and clients, the server's batch sizes
and HTTP stack. The ceiling is the same images run in one local onnxruntime batch, in this
process, on the same device, one intra-op thread per usable core. Loopback only; every loop is
bounded in count and by ``--timeout-s``. The results JSON is rewritten after each model; a model
that fails is recorded with its traceback and the others still run (exit code 1).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_graphs"
RESULTS = REPO / "bench" / "results"
SETTINGS = {"dynamic_batching": {"max_batch": 64, "max_delay_ms": 2.0},  # serve's defaults
            "unbatched": {"max_batch": 1, "max_delay_ms": 0.0},
            # batches only of what queued while the runs were busy (Triton's default max_queue_delay is 0)
            "dynamic_batching_no_delay": {"max_batch": 64, "max_delay_ms": 0.0}}
DEFAULT_SETTINGS = ["dynamic_batching", "unbatched"]


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
    """`onnxmod serve MODEL --port 0 --json` in a subprocess; ``host`` is its host:port once it listens, ``info``
    what it said it runs (its --json line: threads, instances, event loop and HTTP parser). Its stderr goes to
    ``log``, a file (a pipe nobody reads would stall a chatty server)."""

    def __init__(self, model: Path, max_batch: int, max_delay_ms: float, device: str, timeout_s: float,
                 instances: int, threads: int | None, log: Path):
        self.log = log
        with log.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "onnxmod.cli.main", "serve", str(model), "--name", "m", "--port", "0",
                 "--device", device, "--max-batch", str(max_batch), "--max-delay-ms", str(max_delay_ms),
                 "--instances", str(instances), *(["--threads", str(threads)] if threads else []), "--json"],
                stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.info = self._wait_listening(timeout_s)
        self.host = self.info["url"].removeprefix("http://")

    def _wait_listening(self, timeout_s: float) -> dict[str, Any]:
        """The server's --json line, printed once it listens (bounded by ``timeout_s``)."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if line.strip():
            return json.loads(line)
        self.stop()
        raise RuntimeError(f"onnxmod serve did not start within {timeout_s:g} s:\n" + self.log.read_text()[-4000:])

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


def _run_clients(host: str, x: np.ndarray, expect: np.ndarray, ranges: list[range], deadline: float,
                 lat: list[float], errors: list[str]) -> None:
    """One thread and one tritonclient per range of image indices, all at once; returns when all are done."""
    threads = [threading.Thread(target=_client_loop, args=(host, x, expect, r, deadline, lat, errors)) for r in ranges]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _client_group(host: str, x: np.ndarray, expect: np.ndarray, measured: list[range], warm: list[range],
                  timeout_s: float, start: Any, results: Any) -> None:
    """A client process: its clients warm up, wait for every group at ``start`` (a barrier), send their
    measured requests, and put their latencies, errors, end time and this process's CPU seconds on ``results``."""
    warm_lat: list[float] = []
    warm_err: list[str] = []
    _run_clients(host, x, expect, warm, time.monotonic() + timeout_s, warm_lat, warm_err)
    lat: list[float] = []
    errors: list[str] = []
    try:
        start.wait(timeout_s)
        cpu0 = time.process_time()
        _run_clients(host, x, expect, measured, time.monotonic() + timeout_s, lat, errors)
        cpu = time.process_time() - cpu0
    except Exception as e:  # a broken start barrier: reported, never silent
        errors.append(f"{type(e).__name__}: {e}")
        cpu = 0.0
    results.put({"lat": lat, "errors": errors, "warm_errors": warm_err, "end": time.perf_counter(), "cpu_s": cpu})


def _images_of(x: np.ndarray, expect: np.ndarray, ranges: list[range]) -> tuple[np.ndarray, np.ndarray, list[range]]:
    """The images of ``ranges`` (and their expected labels) as arrays of their own, with the ranges into them."""
    idx = np.concatenate([np.arange(r.start, r.stop) for r in ranges])
    bounds = np.cumsum([0, *(len(r) for r in ranges)])
    return x[idx], expect[idx], [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def client_groups(clients: int, procs: int) -> list[list[int]]:
    """Client indices per process, as even as possible: 16 clients in 3 processes -> 6, 5, 5."""
    return [list(range(clients))[k::procs] for k in range(procs)]


def load_test(host: str, x: np.ndarray, expect: np.ndarray, clients: int, requests: int, timeout_s: float,
              warmup: int, server_pid: int, procs: int = 1) -> dict[str, Any]:
    """``clients`` concurrent clients x ``requests`` one-image requests, spread over ``procs`` client processes
    (one Python process is one GIL: on a many-core machine it would cap the load, not the server); client i
    sends images i*requests .. (i+1)*requests-1, after ``warmup`` requests of images past the measured ones.
    The clock starts when every process has warmed up (a barrier) and stops at the last process's last answer."""
    n = clients * requests
    ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no onnxruntime threads or gevent hub copied
    start, results = ctx.Barrier(procs + 1), ctx.Queue()
    workers = []
    for group in client_groups(clients, procs):
        measured = [range(i * requests, (i + 1) * requests) for i in group]
        warm = [range(n + i * warmup, n + (i + 1) * warmup) for i in group]
        gx, gexpect, local = _images_of(x, expect, measured + warm)  # each process gets only its own images
        workers.append(ctx.Process(target=_client_group, daemon=True,
                                   args=(host, gx, gexpect, local[:len(group)], local[len(group):], timeout_s, start,
                                         results)))
    for w in workers:
        w.start()
    got: list[dict[str, Any]] = []
    lost: list[str] = []
    try:
        start.wait(timeout_s)
        cpu0, t0 = cpu_seconds(server_pid), time.perf_counter()
        deadline = time.monotonic() + timeout_s + 30  # the clients stop themselves at timeout_s
        for _ in workers:
            got.append(results.get(timeout=max(1.0, deadline - time.monotonic())))
        server_cpu = cpu_seconds(server_pid) - cpu0
    except Exception as e:  # a client process that died or hung: the run counts it as errors
        lost.append(f"client processes: {type(e).__name__}: {e}")
        t0, server_cpu = time.perf_counter(), 0.0
    finally:
        for w in workers:
            w.join(5)
            if w.is_alive():
                w.kill()
    wall = max((g["end"] for g in got), default=time.perf_counter()) - t0
    lat_ms = np.array([v for g in got for v in g["lat"]]) * 1000
    errors = [e for g in got for e in g["warm_errors"] + g["errors"]] + lost
    client_cpu = sum(g["cpu_s"] for g in got)
    return {
        # unanswered: failed, cut off by --timeout-s, or in a client process that never reported
        "requests": n, "completed": int(lat_ms.size), "unanswered": n - int(lat_ms.size), "errors": len(errors),
        "error_examples": errors[:5], "wall_s": wall, "client_processes": procs,
        # where the machine's cores went during the run: the server process and the client processes
        "cpu_ms_per_request": {"server": 1000 * server_cpu / max(lat_ms.size, 1),
                               "client": 1000 * client_cpu / max(lat_ms.size, 1)},
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


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def ceiling(model: Path, x: np.ndarray, device: str, repeats: int, max_batch: int) -> dict[str, Any]:
    """The same images run locally, no HTTP: in one onnxruntime batch (the ceiling), and in runs of ``max_batch``
    (what the batching server does at best). Best of ``repeats`` after a warm-up; the server's session settings,
    one session with an intra-op thread per usable core (onnxruntime's own default counts physical cores only)."""
    from onnxmod import runtime
    from onnxmod.serve.model import SESSION_CONFIG

    threads = usable_cores()
    sess = runtime.make_session(model, device=device, threads=threads, config=SESSION_CONFIG)
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
    return {"images": len(x), "device": runtime.session_device(sess), "threads": threads, "throughput_ips": one,
            "cpu_ms_per_image": one_cpu, "runs_of_max_batch_ips": runs, "runs_of_max_batch_cpu_ms_per_image": runs_cpu,
            "max_batch": max_batch}


def _median(xs: list[float]) -> float:
    return float(np.median(xs)) if xs else float("nan")


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


def serve_once(model: Path, setting: str, x: np.ndarray, expect: np.ndarray, args: argparse.Namespace,
               log_path: Path) -> dict[str, Any]:
    """A fresh server with ``setting``, the load test against it, its batch statistics and exit code."""
    cfg = SETTINGS[setting]
    server = Server(model, cfg["max_batch"], cfg["max_delay_ms"], args.device, args.timeout_s, args.instances,
                    args.threads, log_path)
    try:
        r = load_test(server.host, x, expect, args.clients, args.requests, args.timeout_s, args.warmup,
                      server.proc.pid, args.client_procs)
        r["server"] = {**cfg, "instances": server.info["instances"], "threads": server.info["threads"],
                       "http_stack": server.info.get("http_stack"), **batch_summary(server.stats())}
    finally:
        code = server.stop()
    r["server"]["exit_code"] = code
    return r


def batching_ratios(rounds: list[dict[str, Any]], median: dict[str, Any], setting: str) -> dict[str, Any]:
    """``setting`` against the unbatched server and the local ceiling: per round (same load conditions), then
    the median over rounds."""
    b_over_u = [_ratio(r[setting]["throughput_rps"], r["unbatched"]["throughput_rps"]) for r in rounds]
    c_over_b = [_ratio(r["ceiling"]["throughput_ips"], r[setting]["throughput_rps"]) for r in rounds]
    # the best local pass, in case runs of max batch beat one huge batch (they can, on a CPU's caches)
    best_over_b = [_ratio(max(r["ceiling"]["throughput_ips"], r["ceiling"]["runs_of_max_batch_ips"]),
                          r[setting]["throughput_rps"]) for r in rounds]
    return {"batched_over_unbatched": _median(b_over_u), "ceiling_over_batched": _median(c_over_b),
            "best_local_over_batched": _median(best_over_b),
            "per_round": {"batched_over_unbatched": b_over_u, "ceiling_over_batched": c_over_b},
            # CPU time per image is far less sensitive to other jobs on a shared machine than wall time
            "cpu": {"unbatched_over_batched_server": _ratio(median["unbatched"]["server_cpu_ms_per_request"],
                                                            median[setting]["server_cpu_ms_per_request"]),
                    "batched_server_over_ceiling": _ratio(median[setting]["server_cpu_ms_per_request"],
                                                          median["ceiling_cpu_ms_per_image"])}}


def goals(ratios: dict[str, Any], median: dict[str, Any], settings: list[str]) -> dict[str, bool]:
    return {"batched_ge_3x_unbatched": ratios["batched_over_unbatched"] >= 3,
            "batched_within_2x_of_ceiling": ratios["ceiling_over_batched"] <= 2,
            "zero_errors": all(median[s]["errors"] == 0 and median[s]["unanswered"] == 0 for s in settings)}


def measure_model(name: str, model: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
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
                f"{cfg['max_delay_ms']} ms), {args.clients} clients x {args.requests} requests "
                f"in {args.client_procs} client process(es)")
            r = serve_once(model, setting, x, expect, args, work / f"serve.{name}.{setting}.{k}.log")
            lat = r["latency_ms"] or {"p50": float("nan"), "p99": float("nan")}
            log(f"  {r['throughput_rps']:.0f} req/s, p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms, "
                f"errors {r['errors']}, unanswered {r['unanswered']}, mean batch {r['server']['mean_batch'] or 0:.1f}, "
                f"CPU ms/request: server {r['cpu_ms_per_request']['server']:.2f}, "
                f"client {r['cpu_ms_per_request']['client']:.2f}")
            rnd[setting] = r
        rnd["ceiling"] = ceiling(model, x[:n], args.device, args.repeats, SETTINGS["dynamic_batching"]["max_batch"])
        log(f"  ceiling: {rnd['ceiling']['throughput_ips']:.0f} images/s in one batch of {n} "
            f"({rnd['ceiling']['cpu_ms_per_image']:.2f} CPU ms/image), "
            f"{rnd['ceiling']['runs_of_max_batch_ips']:.0f} in runs of {rnd['ceiling']['max_batch']}")
        rounds.append(rnd)
    out: dict[str, Any] = {"model": model.name, "images_per_round": n, "rounds": rounds, "median": {}}
    med = out["median"]
    for setting in args.settings:
        med[setting] = {
            "throughput_rps": _median([r[setting]["throughput_rps"] for r in rounds]),
            "p50_ms": _median([r[setting]["latency_ms"]["p50"] for r in rounds if r[setting]["latency_ms"]]),
            "p99_ms": _median([r[setting]["latency_ms"]["p99"] for r in rounds if r[setting]["latency_ms"]]),
            "errors": sum(r[setting]["errors"] for r in rounds),
            "unanswered": sum(r[setting]["unanswered"] for r in rounds),
            "mean_batch": _median([r[setting]["server"]["mean_batch"] or 0 for r in rounds]),
            "server_cpu_ms_per_request": _median([r[setting]["cpu_ms_per_request"]["server"] for r in rounds]),
            "client_cpu_ms_per_request": _median([r[setting]["cpu_ms_per_request"]["client"] for r in rounds]),
        }
    med["ceiling_ips"] = _median([r["ceiling"]["throughput_ips"] for r in rounds])
    med["local_runs_of_max_batch_ips"] = _median([r["ceiling"]["runs_of_max_batch_ips"] for r in rounds])
    med["ceiling_cpu_ms_per_image"] = _median([r["ceiling"]["cpu_ms_per_image"] for r in rounds])
    if "unbatched" in args.settings:
        batched = [s for s in args.settings if SETTINGS[s]["max_batch"] > 1]
        by_setting = {s: batching_ratios(rounds, med, s) for s in batched}
        if "dynamic_batching" in by_setting:  # the goals are for serve's default batching
            out["ratios"] = by_setting.pop("dynamic_batching")
            out["goals"] = goals(out["ratios"], med, args.settings)
        out["other_settings"] = {s: {"ratios": r, "goals": goals(r, med, args.settings)} for s, r in by_setting.items()}
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


def auto_client_procs(clients: int) -> int:
    """Client processes for ``--client-procs 0``: one per 4 usable cores (a tritonclient process drives ~5k
    requests/s on one core at best), at least 1, at most one per client."""
    return max(1, min(clients, usable_cores() // 4))


def measure_all(models: dict[str, Path], args: argparse.Namespace, work: Path, results: dict[str, Any],
                out: Path, t0: float) -> int:
    """Every model in turn; the results JSON is rewritten after each, so a cut-off run keeps what it measured.
    A model that fails gets its traceback in the JSON and the others still run; returns the failures."""
    failures = 0
    for name, path in models.items():
        try:
            results["models"][name] = measure_model(name, path, args, work)
        except Exception:  # reported in the JSON and on stderr; the next model still runs
            failures += 1
            results["models"][name] = {"model": path.name, "failed": traceback.format_exc()}
            log(f"{name} failed:\n{results['models'][name]['failed']}")
        results["machine"]["total_s"] = time.perf_counter() - t0
        results["machine"]["loadavg_end"] = list(os.getloadavg())
        out.write_text(json.dumps(results, indent=2) + "\n")
    return failures


def _unwind(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


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
    ap.add_argument("--client-procs", type=int, default=0,
                    help="processes the clients are spread over (0: one per 4 usable cores, at least 1)")
    ap.add_argument("--repeats", type=int, default=3, help="ceiling: timed runs of the one-batch pass per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every setting + ceiling; medians reported")
    ap.add_argument("--instances", type=int, default=2, help="serve --instances, the same for every setting")
    ap.add_argument("--threads", type=int, default=None, help="serve --threads (default: serve's own)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    ap.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                    help=f"comma-separated, from: {', '.join(SETTINGS)}")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="bound on each load run")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: bench/results/serve_http.json; "
                                                          "--smoke: a temp dir)")
    args = ap.parse_args(argv)
    args.settings = [s for s in args.settings.split(",") if s]
    if unknown := set(args.settings) - set(SETTINGS):
        ap.error(f"unknown settings {sorted(unknown)}")
    if args.client_procs < 0:
        ap.error("--client-procs must be >= 0")
    if args.smoke:
        args.clients, args.requests, args.warmup, args.repeats, args.rounds = 4, 10, 1, 1, 1
    args.client_procs = min(args.client_procs, args.clients) or auto_client_procs(args.clients)
    command = "python bench/serve_http.py " + " ".join(argv if argv is not None else sys.argv[1:])
    signal.signal(signal.SIGTERM, _unwind)  # e.g. from `timeout`: stop the servers and client processes on the way out
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="serve_http.") as tmp:
        work = Path(tmp)
        models = {p.stem: p for p in args.model} if args.model else {"resnet8_composed": composed_resnet8(work)}
        if args.data is not None and not args.smoke:
            models["resnet20_composed"] = composed_resnet20(work, args.data)
        results = {"machine": machine(command.strip(), "smoke" if args.smoke else "full", args.device),
                   "settings": {"clients": args.clients, "requests_per_client": args.requests,
                                "warmup_per_client": args.warmup, "client_processes": args.client_procs,
                                "rounds": args.rounds, "device": args.device,
                                "instances": args.instances, "threads": args.threads,
                                "servers": {s: SETTINGS[s] for s in args.settings}, "http_stack": http_stack(),
                                "client": "tritonclient.http, one client per thread, binary tensors, "
                                          "one request in flight per client", "images": "sample_graphs/cifar10_test.npz"},
                   "models": {}}
        out = args.out or ((work / "serve_http.json") if args.smoke else RESULTS / "serve_http.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        failures = measure_all(models, args, work, results, out, t0)
        log(f"wrote {out}")
    errors = sum(m["median"][s]["errors"] + m["median"][s]["unanswered"]
                 for m in results["models"].values() if "median" in m for s in args.settings)
    if errors or failures:
        log(f"{errors} errors, {failures} model(s) failed")
    return 1 if errors or failures else 0


if __name__ == "__main__":
    sys.exit(main())

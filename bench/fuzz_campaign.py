"""The mutation campaign: thousands of mutated inputs fed to the readers, the net builder, the
weights loader, the converters, the solver and the CLI verbs, each case in a worker process whose
address space is capped (an allocation past the budget fails there instead of swapping the
machine) and which is killed when a case runs past the time limit.

    python bench/fuzz_campaign.py                          # 10,000 cases, 1 worker
    python bench/fuzz_campaign.py --cases 500 --targets builder,cli --workers 2
    python bench/fuzz_campaign.py --replay 1234            # rerun case 1234 here, with traceback

Prints the count per outcome (ok, reported, unsupported, and the problems: escaped exceptions,
unnamed errors, tracebacks printed by the CLI, hangs, big allocations, silent partial loads,
worker crashes), per target, and the top places problems come from (file:line), each with one
example case to replay. `--json FILE` writes every problem case. Case i is reproducible: its
target, seed file and mutation follow from (--seed, i) alone.
"""
import argparse
import collections
import json
import multiprocessing as mp
import os
import queue
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CRASH = "crash"


def case_plan(engine, seeds, index, seed_value, targets):
    """(target, kind, seed, chooser) of case `index`: deterministic in (seed_value, index)."""
    rng = random.Random(f"{seed_value}:{index}")
    chooser = engine.Chooser(rng)
    target = targets[index % len(targets)]
    kind, seed = engine.pick_seed(target, seeds, chooser)
    return target, kind, seed, chooser


def worker(number, tasks, results, scratch, seed_value, targets, memory_gb):
    os.environ.setdefault("SEGAWARE_DATA_WORKERS", "0")   # no loader subprocesses per case
    # the CLI target runs main() in this process: a kept heap would carry every case's peak
    # memory into the next ones, under the worker's memory cap
    os.environ.setdefault("SEGAWARE_KEEP_FREED_MEMORY", "0")
    from tests.fuzz import engine
    seeds = engine.build_seeds(Path(scratch) / f"seeds{number}")
    folder = Path(scratch) / f"work{number}"
    folder.mkdir(exist_ok=True)
    engine.limit_memory(int(memory_gb * (1 << 30)))
    results.put(("ready", number, None))
    while True:
        index = tasks.get()
        if index is None:
            return
        results.put(("start", number, index))
        target, kind, seed, chooser = case_plan(engine, seeds, index, seed_value, targets)
        outcome = engine.run_case(target, kind, seed, folder, chooser)
        engine.clean(folder)
        results.put(("done", number, {
            "index": index, "target": target, "kind": kind,
            "seed": f"{seed.case.name if seed.case else '-'}/{seed.name}",
            "outcome": outcome.outcome, "detail": outcome.detail, "message": outcome.message}))


class Pool:
    """Worker processes fed one case at a time, so a hung or crashed case is known."""

    def __init__(self, count, scratch, args, targets):
        self.context = mp.get_context("spawn")
        self.results = self.context.Queue()
        self.args, self.targets, self.scratch = args, targets, scratch
        self.workers = {}
        self.failed_starts = 0
        for number in range(count):
            self._start(number)

    def _start(self, number):
        tasks = self.context.Queue()
        process = self.context.Process(target=worker, daemon=True, args=(
            number, tasks, self.results, self.scratch, self.args.seed, self.targets,
            self.args.memory_gb))
        process.start()
        self.workers[number] = {"process": process, "tasks": tasks, "case": None, "since": None,
                                "ready": False}

    def restart(self, number):
        process = self.workers[number]["process"]
        if process.is_alive():
            process.kill()
        process.join(5)
        self._start(number)


def summarize(records, elapsed, top):
    from tests.fuzz.engine import PROBLEMS
    counts = collections.Counter(r["outcome"] for r in records)
    print(f"\n{len(records)} cases in {elapsed:.0f} s")
    width = max(len(k) for k in list(counts) + ["outcome"])
    for outcome in ["ok", "reported", "unsupported", *PROBLEMS, CRASH]:
        if counts.get(outcome):
            print(f"  {outcome:<{width}}  {counts[outcome]:6d}")
    by_target = collections.defaultdict(collections.Counter)
    for r in records:
        by_target[r["target"]][r["outcome"]] += 1
    print("\nper target:")
    for target, outcomes in sorted(by_target.items()):
        print(f"  {target:<12} " + ", ".join(f"{k} {v}" for k, v in outcomes.most_common()))
    problems = [r for r in records if r["outcome"] in PROBLEMS or r["outcome"] == CRASH]
    places = collections.Counter((r["outcome"], r["detail"]) for r in problems)
    print(f"\n{len(problems)} problem case(s) from {len(places)} place(s); top {top}:")
    for (outcome, detail), count in places.most_common(top):
        example = next(r for r in problems if (r["outcome"], r["detail"]) == (outcome, detail))
        print(f"  {count:5d}  {outcome:<19} {detail}")
        print(f"         e.g. case {example['index']} ({example['target']}, {example['kind']} "
              f"{example['seed']}): {example['message'][:160]!r}")
    return problems


def replay(index, args, targets):
    """Run one case in this process and show what it raised, with the traceback."""
    os.environ.setdefault("SEGAWARE_DATA_WORKERS", "0")
    os.environ.setdefault("SEGAWARE_KEEP_FREED_MEMORY", "0")
    from tests.fuzz import engine
    scratch = Path(tempfile.mkdtemp(prefix="segaware-fuzz-"))
    try:
        seeds = engine.build_seeds(scratch / "seeds")
        folder = scratch / "work"
        folder.mkdir()
        target, kind, seed, chooser = case_plan(engine, seeds, index, args.seed, targets)
        print(f"case {index}: target {target}, {kind} from {seed.case.name if seed.case else '-'}/{seed.name}")
        engine.RAISE = True
        os.environ["SEGAWARE_DEBUG"] = "1"
        outcome = engine.run_case(target, kind, seed, folder, chooser)
        print(f"outcome: {outcome.outcome} {outcome.detail}\n{outcome.message}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv=None):
    from tests.fuzz.engine import TARGETS, TIME_LIMIT_S
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", default="0", help="campaign seed (default 0)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help=f"comma-separated subset of {', '.join(TARGETS)}")
    parser.add_argument("--memory-gb", type=float, default=4.0,
                        help="address-space budget per case above the worker's own (default 4)")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT_S,
                        help=f"seconds before a case counts as a hang (default {TIME_LIMIT_S}); "
                             f"a worker is killed at twice this")
    parser.add_argument("--top", type=int, default=40, help="problem places listed (default 40)")
    parser.add_argument("--json", metavar="FILE", help="write every problem case here")
    parser.add_argument("--replay", type=int, metavar="INDEX", help="rerun one case in-process")
    args = parser.parse_args(argv)
    targets = tuple(t for t in args.targets.split(",") if t)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    if args.replay is not None:
        replay(args.replay, args, targets)
        return 0
    scratch = tempfile.mkdtemp(prefix="segaware-fuzz-")
    records, start = [], time.time()
    pool = Pool(max(1, args.workers), scratch, args, targets)
    pending = list(range(args.cases))[::-1]
    kill_after = 2 * args.time_limit + 5
    try:
        while len(records) < args.cases:
            try:
                kind, number, payload = pool.results.get(timeout=1)
            except queue.Empty:
                kind = None
            if kind == "ready":
                pool.workers[number]["ready"] = True
            elif kind == "start":
                pool.workers[number].update(case=payload, since=time.time())
            elif kind == "done":
                records.append(payload)
                pool.workers[number].update(case=None, since=None)
                if len(records) % 500 == 0:
                    print(f"{len(records)} cases, {time.time() - start:.0f} s", flush=True)
            for number, state in list(pool.workers.items()):
                stuck = state["since"] is not None and time.time() - state["since"] > kill_after
                dead = not state["process"].is_alive()
                if (stuck or dead) and state["case"] is not None:
                    how = "hang" if stuck else CRASH
                    code = state["process"].exitcode
                    records.append({"index": state["case"], "target": targets[state["case"] % len(targets)],
                                    "kind": "?", "seed": "?", "outcome": how,
                                    "detail": f"worker {'killed after %.0f s' % kill_after if stuck else f'died (exit {code})'}",
                                    "message": ""})
                    pool.restart(number)
                elif dead:
                    pool.failed_starts += 1
                    if pool.failed_starts > 5:
                        raise RuntimeError("workers keep dying before their first case; run "
                                           "--replay 0 to see why")
                    pool.restart(number)
                elif state["ready"] and state["case"] is None and pending:
                    index = pending.pop()
                    state.update(case=index, since=time.time())
                    state["tasks"].put(index)
    except KeyboardInterrupt:
        print("interrupted: summary of the cases done so far")
    finally:
        for state in pool.workers.values():
            state["tasks"].put(None)
        for state in pool.workers.values():
            state["process"].join(5)
            if state["process"].is_alive():
                state["process"].kill()
        shutil.rmtree(scratch, ignore_errors=True)
    problems = summarize(records, time.time() - start, args.top)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(problems, f, indent=1)
        print(f"wrote {len(problems)} problem case(s) to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

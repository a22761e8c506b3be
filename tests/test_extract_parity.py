"""The fast extractor (schema.extract) against the straightforward one it replaced, bit for bit.

tests/extract_reference.py is the extractor as it was (v1). The rewrite promises the same
output to the last bit, so EXTRACTOR_VERSION and the schema hash stay: every tensor,
coverage and summary here is compared as raw bits, on random episodes built to hit every
branch (NaN gaps, counter resets, clock steps back, repeated timestamps, late and silent
sources, missing sources, qmp at 1 Hz, bad interval_ms, negative zeros) and on a synthetic
store read back from its archives. Each window is given both ways the callers give it: only
its own rows, as the edge tailer hands them, and the whole stream, as ``phasewatch bench``
does (then the extractor selects the span itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import extract_reference as ref
import numpy as np
import pytest

from schema import extract
from schema.channels import CHANNELS, LOOKBACK_NS, MIN_COVERAGE, SOURCE_SLICE
from schema.rows import row_fields
from schema.vocab import SOURCES

T0 = 1_750_000_000_000_000_000
S = 1_000_000_000


@dataclass
class Cols:
    t_wall_ns: np.ndarray
    values: np.ndarray


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _random_source(rng: np.random.Generator, source: str, seconds: float, seen: set[str]) -> Cols:
    hz = 1.0 if source == "qmp" else float(rng.choice([10.0, 10.0, 5.0, 2.0]))
    late = float(rng.uniform(0, seconds * 0.6)) if rng.random() < 0.2 else 0.0
    n = max(0, int((seconds - late) * hz))
    step = S / hz
    # Jittered, or exactly on the 10 Hz grid (then some steps are exactly HOLD_NS after a row).
    jitter = rng.normal(0, step * 0.08, n) if rng.random() < 0.7 else np.zeros(n)
    t = T0 + int(late * 10) * S // 10 + (np.arange(n) * step + jitter).astype(np.int64)
    t.sort()
    if n > 20 and rng.random() < 0.3:  # the stream went silent for a while
        a = int(rng.integers(5, n - 10))
        keep = np.ones(n, bool)
        keep[a : a + int(rng.integers(5, max(6, n // 3)))] = False
        t = t[keep]
        seen.add("silence")
    n = len(t)
    if n > 10 and rng.random() < 0.3:  # NTP stepped the clock back
        t[int(rng.integers(2, n - 2)) :] -= int(rng.uniform(0.2, 4.0) * S)
        seen.add("step_back")
    if n > 10 and rng.random() < 0.2:  # two rows with one timestamp
        i = int(rng.integers(1, n))
        t[i] = t[i - 1]
        seen.add("repeat")
    fields = row_fields(source)
    v = np.empty((n, len(fields)))
    kinds = {c.field: c.transform for c in CHANNELS[SOURCE_SLICE[source]]}
    for j, name in enumerate(fields):
        if name == "interval_ms":
            col = np.full(n, 100.0)
            if n and rng.random() < 0.4:
                col[rng.integers(0, n, 3)] = rng.choice([0.0, -100.0, np.nan, 250.0])
                seen.add("bad_interval")
        elif kinds[name] == "rate":
            col = np.cumsum(rng.exponential(50.0 * (j + 1), n))
            if n > 5 and rng.random() < 0.3:  # the counter restarted from zero
                i = int(rng.integers(1, n))
                col[i:] -= col[i - 1] - rng.uniform(0, 10)
                seen.add("reset")
            if n > 5 and rng.random() < 0.3:  # ... just below where it was: a delta in (-1, 0)
                i = int(rng.integers(1, n))
                col[i:] -= col[i] - col[i - 1] + rng.uniform(0, 1)
                seen.add("small_reset")
        else:
            col = rng.normal(100.0 * (j + 1), 30.0, n)
            if n and rng.random() < 0.2:
                col[rng.integers(0, n, 4)] = -0.0
        if n and rng.random() < 0.25:  # NaN gaps, single cells and whole rows
            col[rng.integers(0, n, int(rng.integers(1, 8)))] = np.nan
            seen.add("nan")
        v[:, j] = col
    if n > 3 and rng.random() < 0.15:
        v[rng.integers(0, n, 2), :] = np.nan
    return Cols(t, v)


def _random_episode(rng: np.random.Generator, seconds: float, seen: set[str]) -> dict[str, Cols]:
    streams = {}
    for s in SOURCES:
        r = rng.random()
        if r < 0.08:
            seen.add("absent")
            continue
        if r < 0.12:
            streams[s] = Cols(np.zeros(0, np.int64), np.zeros((0, len(row_fields(s)))))
            continue
        streams[s] = _random_source(rng, s, seconds, seen)
    return streams


def _own_rows(streams: dict[str, Cols], t0: int, w: int) -> dict[str, Cols]:
    """What the tailer hands over (ColumnBuilder.window): the span's rows, in arrival order."""
    lo, hi = extract.window_start_ns(t0, w) - LOOKBACK_NS, extract.window_last_step_ns(t0, w)
    out = {}
    for s, c in streams.items():
        k = (c.t_wall_ns >= lo) & (c.t_wall_ns <= hi)
        out[s] = Cols(c.t_wall_ns[k], c.values[k])
    return out


def _check_window(streams: dict[str, Cols], t0: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(all="ignore"):
        want_t, want_c = ref.extract_window(streams, t0, w)
        got = extract.extract_window(streams, t0, w)
    assert got.w == w and got.start_ns == extract.window_start_ns(t0, w)
    assert got.tensor.flags.c_contiguous
    assert _same_bits(got.tensor, want_t), f"window {w}: tensor differs"
    assert _same_bits(got.coverage, want_c), f"window {w}: coverage differs"
    with np.errstate(all="ignore"):
        assert _same_bits(extract.summarize(got.tensor), ref.summarize(want_t)), f"window {w}: summary"
    return want_t, want_c


@pytest.mark.parametrize("seed", range(12))
def test_random_windows_are_bit_identical_to_the_reference(seed: int) -> None:
    streams = _random_episode(np.random.default_rng(seed), 45.0, set())
    tensors = []
    for w in range(extract.n_windows(T0, T0 + 45 * S)):
        tensors.append(_check_window(_own_rows(streams, T0, w), T0, w)[0])
        _check_window(streams, T0, w)  # the whole stream: the extractor selects the span
    # a batch summarises as its windows do, and as the reference does
    batch = np.stack(tensors)
    with np.errstate(all="ignore"):
        assert _same_bits(extract.summarize(batch), ref.summarize(batch))


def test_random_episodes_hit_every_branch() -> None:
    """The parity above means little unless the random episodes reach every case."""
    seen: set[str] = set()
    unusable = filled = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        streams = _random_episode(rng, 45.0, seen)
        for w in range(extract.n_windows(T0, T0 + 45 * S)):
            with np.errstate(all="ignore"):
                win = extract.extract_window(streams, T0, w)
            present = [SOURCES.index(s) for s in streams]
            cov = win.coverage[present]
            unusable += int((cov < MIN_COVERAGE).any())
            filled += int(((cov >= MIN_COVERAGE) & (cov < 1)).any())
    assert {"silence", "step_back", "repeat", "bad_interval", "reset", "small_reset", "nan", "absent"} <= seen
    assert unusable > 0 and filled > 0


def test_fixed_episode_and_its_streams_path_match_the_reference() -> None:
    """extract_streams (the trainer's path) keeps exactly the reference's windows."""
    from test_extract import fixed_episode

    streams = fixed_episode(60)
    streams["proc"].t_wall_ns[300:] -= 2 * S  # a clock step back: this stream is cut by the slow path
    ew = extract.extract_streams(streams, T0)
    for i, w in enumerate(ew.windows.tolist()):
        want_t, want_c = ref.extract_window(streams, T0, w)
        assert _same_bits(ew.tensor[i], want_t) and _same_bits(ew.coverage[i], want_c)
    assert _same_bits(ew.summary, ref.summarize(ew.tensor))


def test_window_with_no_rows_at_all() -> None:
    empty = {s: Cols(np.zeros(0, np.int64), np.zeros((0, len(row_fields(s))))) for s in SOURCES}
    for streams in ({}, empty):
        want_t, want_c = ref.extract_window(streams, T0, 0)
        got = extract.extract_window(streams, T0, 0)
        assert _same_bits(got.tensor, want_t) and _same_bits(got.coverage, want_c)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.synth import generate_store

    out = tmp_path_factory.mktemp("parity") / "store"
    generate_store(out, episodes=3, hosts=2, seed=13, jobs=1, progress=False)
    return out


def test_store_windows_are_bit_identical_to_the_reference(store: Path) -> None:
    from schema.reader import read_episode

    archives = sorted(store.rglob("*.tar.zst"))
    assert archives
    n = 0
    for path in archives:
        ep = read_episode(path)
        assert ep.meta is not None and "proc" in ep.streams
        t0 = ep.meta.started_ns
        streams = {s: Cols(c.t_wall_ns, c.values) for s, c in ep.streams.items()}
        for w in range(extract.n_windows(t0, int(ep.streams["proc"].t_wall_ns.max()))):
            _check_window(_own_rows(streams, t0, w), t0, w)
            if w % 7 == 0:  # the whole episode each time is slow; a sample of windows
                _check_window(streams, t0, w)
            n += 1
        ew = extract.extract_episode(ep)
        assert _same_bits(ew.summary, ref.summarize(ew.tensor))
    assert n > 100


def test_rows_outside_the_span_between_in_span_ends() -> None:
    """A stream whose first and last rows are in the span is not necessarily all in it: after
    clock steps, rows in between may lie before or after it, and are not the window's."""
    from test_extract import fixed_episode

    streams = fixed_episode(40)
    w = 3
    own = _own_rows(streams, T0, w)
    lo, hi = extract.window_start_ns(T0, w) - LOOKBACK_NS, extract.window_last_step_ns(T0, w)
    proc, qmp = own["proc"], own["qmp"]
    proc.t_wall_ns[40] = lo - 3 * S  # stepped back far, then forward again
    proc.t_wall_ns[90] = hi + 2 * S  # stepped forward past the window, then back
    qmp.t_wall_ns[5] = lo - 1
    win = extract.extract_window(own, T0, w)
    want_t, want_c = ref.extract_window(own, T0, w)
    assert _same_bits(win.tensor, want_t) and _same_bits(win.coverage, want_c)


def test_values_narrower_than_the_row_fields_are_refused() -> None:
    from test_extract import fixed_episode

    streams = _own_rows(fixed_episode(20), T0, 1)
    streams["guest"] = Cols(streams["guest"].t_wall_ns, streams["guest"].values[:, :-2])
    with pytest.raises(ValueError, match="guest"):
        extract.extract_window(streams, T0, 1)

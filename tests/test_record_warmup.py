"""benchmarks/record_warmup.py: the warm-up clock between the record's two training-loader constructions."""

import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import record_warmup  # noqa: E402


def fake_record(events: list):
    """A stand-in with the record's shape: main() builds a loader, warms up, builds a fresh loader, trains."""

    class DocumentPackingLoader:
        def __init__(self, h, device):
            events.append("loader")

    def main():
        DocumentPackingLoader(None, None)
        time.sleep(0.05)  # the warm-up
        events.append("warmup")
        DocumentPackingLoader(None, None)
        events.append("train")

    return types.SimpleNamespace(DocumentPackingLoader=DocumentPackingLoader, main=main, torch=None)


def test_the_warmup_is_the_time_between_the_two_loaders():
    events, seconds = [], []
    record = fake_record(events)
    record_warmup.install_warmup_clock(record, lambda s: (seconds.append(s), events.append("clock")))
    record.main()
    assert events == ["loader", "warmup", "clock", "loader", "train"]
    assert len(seconds) == 1 and 0.05 <= seconds[0] < 1.0

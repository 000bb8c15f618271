"""TRACE's data layout: ``DATA_DIR/<task>/{train,eval,test}.json``, each a JSON list of
``{"prompt": str, "answer": str}`` records (the layout of TRACE's ``LLM-CL-Benchmark_*`` archives).

Every problem with a file is a one-line ``UserError`` that names the file (and the record) and says
what to do.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional

from torch.utils.data import Dataset

from cl_merge.errors import UserError

# TRACE split file -> harness split
SPLIT_FILES = {"train": "train.json", "val": "eval.json", "test": "test.json"}

WHERE = ("download TRACE's benchmark archive (LLM-CL-Benchmark_500/_1000/_5000, linked from "
         "https://github.com/BeyonderXX/TRACE), unpack it and set benchmark.data_dir=DIR so that "
         "DIR/<task>/train.json, eval.json and test.json exist")


class RecordDataset(Dataset):
    """A task split: a list of ``{"prompt", "answer"}`` dicts."""

    def __init__(self, records: List[Dict[str, str]]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Dict[str, str]:
        return self.records[i]


def task_dir(data_dir: Optional[str], task: str) -> Path:
    if not data_dir:
        raise UserError(f"benchmark.data_dir is not set: {WHERE}")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"TRACE data folder {root} does not exist: {WHERE}")
    folder = root / task
    if not folder.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise UserError(f"TRACE task folder {folder} is missing (found: {', '.join(present) or 'none'}): {WHERE}")
    return folder


def load_split(path: Path, limit: Optional[int] = None) -> List[Dict[str, str]]:
    """The records of one split file, checked; the first ``limit`` records when a cap is given."""
    if not path.is_file():
        raise UserError(f"TRACE split file {path} is missing: {WHERE}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-extract the archive") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); "
                        f"re-extract the archive or fix the file") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of {{\"prompt\", \"answer\"}} records, "
                        f"found a JSON {type(data).__name__}")
    if not data:
        raise UserError(f"{path}: the list of records is empty; every split needs at least one "
                        f"{{\"prompt\", \"answer\"}} record")
    if limit is not None:
        data = data[:limit]
    records = []
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise UserError(f"{path}: record {i} is a JSON {type(record).__name__}, expected an object "
                            f"with string fields \"prompt\" and \"answer\"")
        for key in ("prompt", "answer"):
            if key not in record:
                raise UserError(f"{path}: record {i} has no \"{key}\" field (fields: "
                                f"{', '.join(map(str, record)) or 'none'}); each record needs \"prompt\" and \"answer\"")
            if not isinstance(record[key], str):
                raise UserError(f"{path}: record {i} field \"{key}\" is a JSON {type(record[key]).__name__}, "
                                f"expected a string")
        records.append({"prompt": record["prompt"], "answer": record["answer"]})
    return records


def load_task(data_dir: Optional[str], task: str, caps: Dict[str, Optional[int]]):
    """{split: RecordDataset} and a fingerprint of exactly the records used."""
    folder = task_dir(data_dir, task)
    splits, digest = {}, hashlib.sha256(task.encode())
    for split, filename in SPLIT_FILES.items():
        cap = caps.get(split)
        if cap is not None and cap < 1:
            raise UserError(f"the {split} size cap must be >= 1 (or none for all records); got {cap}")
        records = load_split(folder / filename, cap)
        digest.update(split.encode())
        digest.update(json.dumps(records, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        splits[split] = RecordDataset(records)
    return splits, digest.hexdigest()

#!/usr/bin/env python3
"""The modules of src/ in layers that only point down (docs/ARCHITECTURE.md, "Layers"): a module
may use one of a lower layer, never one of its own or a higher layer. Reads every `crate::`
path in src/ and fails naming each edge that breaks the table. Run by `make lint`."""
import re
import sys
from pathlib import Path

# Lowest first. A new module is added here, in the layer of what it is.
LAYERS = [
    ("foundations: pure crypto and process plumbing", {"crypto", "bytea", "gucs", "signals", "search_path", "log_redaction"}),
    ("errors", {"error"}),
    ("Postgres plumbing: queries on a fresh snapshot, lock tags", {"pg"}),
    ("event counters", {"counters"}),
    ("where this node stands", {"citus", "replica", "connections"}),
    ("data keys", {"keys"}),
    ("sealing, opening and hashing values", {"sealing"}),
    ("the registry of protected columns, and the outbox of side-transaction jobs",
     {"protected_columns", "outbox"}),
    ("the audit log, and the keys' jobs", {"audit", "key_jobs"}),
    ("the SQL-facing API and the background processes",
     {"encryption", "identity", "mfa", "session_settings", "sweeper", "shmem", "lib", "pg_tests", "metrics"}),
]
LAYER = {module: rank for rank, (_name, modules) in enumerate(LAYERS) for module in modules}
SRC = Path(__file__).resolve().parent.parent / "src"


def uses(text):
    """The top-level modules a file names through `crate::`, braces included."""
    found = set(re.findall(r"\bcrate::([a-z_]+)", text))
    for group in re.findall(r"\bcrate::\{([^}]*)\}", text):
        found.update(re.findall(r"(?:^|,)\s*([a-z_]+)", group))
    return found


def main():
    broken = []
    for path in sorted(SRC.rglob("*.rs")):
        module = path.relative_to(SRC).parts[0].removesuffix(".rs")
        if module not in LAYER:
            broken.append(f"{path.relative_to(SRC.parent)}: module {module} is in no layer (scripts/layers.py)")
            continue
        for used in sorted(uses(path.read_text()) - {module}):
            if used not in LAYER:
                broken.append(f"{path.relative_to(SRC.parent)}: uses crate::{used}, which is in no layer")
            elif LAYER[used] >= LAYER[module]:
                broken.append(f"{path.relative_to(SRC.parent)}: {module} ({LAYERS[LAYER[module]][0]}) "
                              f"uses {used} ({LAYERS[LAYER[used]][0]}), not below it")
    print("\n".join(broken) if broken else "layers: every module uses only lower layers")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())

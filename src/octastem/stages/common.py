"""What every stage shares: the job's log file and the provenance of a Snakemake job."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

from threadpoolctl import threadpool_limits

from octastem import io

log = logging.getLogger("octastem")


def run_context(smk) -> dict:
    """Provenance of a Snakemake job: rule, wildcards, params (seeds), config hash, input checksums."""
    inputs = {}
    for path in smk.input:
        p = Path(path)
        if p.is_file():
            inputs[str(path)] = io.sha256_file(p)
    return {
        "rule": smk.rule,
        "wildcards": dict(smk.wildcards.items()),
        "params": {k: v for k, v in smk.params.items()},
        "config_sha256": io.config_hash(dict(smk.config)),
        "inputs_sha256": inputs,
    }


@contextlib.contextmanager
def logged(path: str | os.PathLike | None, smk=None):
    """Send logging, warnings and stderr (progress bars) of a stage to ``path``; SIGTERM ends the stage
    as an exception would (:func:`octastem.io.exit_on_sigterm`), removing its temporary files.

    With the ``snakemake`` object ``smk``, every provenance record written by the stage also
    carries the job's rule, params, config hash and input checksums (:data:`io.RUN_CONTEXT`).
    """
    io.exit_on_sigterm()  # a SIGTERM (SLURM time limit) unwinds the stage: its temporary outputs go
    if smk is not None:
        io.RUN_CONTEXT.clear()
        io.RUN_CONTEXT.update(run_context(smk))
    with contextlib.ExitStack() as stack:
        if smk is not None and getattr(smk, "threads", None):
            # the job's BLAS/OpenMP pools sized to the threads Snakemake gave its rule
            stack.enter_context(threadpool_limits(limits=int(smk.threads)))
        if path is None:
            yield
        else:
            with _log_to(path):
                yield


@contextlib.contextmanager
def _log_to(path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        handler = logging.StreamHandler(fh)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        old = sys.stderr
        sys.stderr = fh
        if io.RUN_CONTEXT:
            log.info("provenance: %s", io.provenance())
        try:
            yield
        except Exception:
            log.exception("stage failed")
            raise
        finally:
            sys.stderr = old
            root.removeHandler(handler)

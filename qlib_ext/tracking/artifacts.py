"""Reading pickled MLflow artifacts (``pred.pkl``, ``label.pkl``, a backtest report) on the operator's side
as data: pandas/numpy frames and series only.

``pd.read_pickle`` of an artifact runs whatever the pickle says, and anyone who can write to the MLflow
tracking store (or the pool, whose workers write artifacts) can plant one; the leaderboard and reports
run on the operator's account. :func:`read_frame` unpickles allowing only the reconstruction functions
of pandas and numpy objects and plain data (:data:`FRAME_GLOBALS`: Qlib main's
``qlib.utils.pickle_utils`` list for pandas/numpy, plus the names pandas 3 pickles under, without Qlib
classes); anything else is refused with :class:`~qlib_ext.errors.TaskDecodeError`. pandas 3's Arrow-backed
string arrays are rebuilt through :func:`_checked_arrow_array` (buffers checked against the claimed length),
never by pyarrow's own reconstructor, which trusts the pickle and can be made to read out of bounds.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from qlib_ext import defaults
from qlib_ext.errors import ArtifactTampered, TaskDecodeError
from qlib_ext.pool.codec import SAFE_GLOBALS, AllowListUnpickler

logger = logging.getLogger(__name__)

_OFFSETS = ("Day", "BusinessDay", "Week", "MonthBegin", "MonthEnd", "BusinessMonthBegin", "BusinessMonthEnd",
            "QuarterBegin", "QuarterEnd", "YearBegin", "YearEnd", "Hour", "Minute", "Second", "Milli", "Micro", "Nano")

_PANDAS_TOP = ("DataFrame", "Series", "Index", "MultiIndex", "RangeIndex", "DatetimeIndex", "TimedeltaIndex",
               "PeriodIndex", "CategoricalIndex", "IntervalIndex", "Categorical", "CategoricalDtype", "StringDtype",
               "DatetimeTZDtype", "PeriodDtype", "IntervalDtype", "Timestamp", "Timedelta", "Period",
               "Int8Dtype", "Int16Dtype", "Int32Dtype", "Int64Dtype", "UInt8Dtype", "UInt16Dtype", "UInt32Dtype",
               "UInt64Dtype", "Float32Dtype", "Float64Dtype", "BooleanDtype")

_PANDAS_ARRAYS = ("ArrowStringArray", "StringArray", "DatetimeArray", "TimedeltaArray", "PeriodArray",
                  "IntervalArray", "Categorical", "IntegerArray", "FloatingArray", "BooleanArray",
                  "ArrowExtensionArray")

FRAME_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    *SAFE_GLOBALS,
    ("numpy", "ndarray"), ("numpy", "dtype"),
    *((m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    *(("pandas", n) for n in _PANDAS_TOP),
    *(("pandas.arrays", n) for n in _PANDAS_ARRAYS),
    ("pandas.core.series", "Series"), ("pandas.core.frame", "DataFrame"),
    ("pandas.core.internals.managers", "BlockManager"), ("pandas.core.internals.managers", "SingleBlockManager"),
    ("pandas.core.internals.blocks", "new_block"), ("pandas._libs.internals", "_unpickle_block"),
    ("pandas.core.indexes.base", "_new_Index"), ("pandas.core.indexes.base", "Index"),
    ("pandas.core.indexes.range", "RangeIndex"), ("pandas.core.indexes.multi", "MultiIndex"),
    ("pandas.core.indexes.datetimes", "_new_DatetimeIndex"), ("pandas.core.indexes.datetimes", "DatetimeIndex"),
    ("pandas._libs.tslibs.timestamps", "_unpickle_timestamp"), ("pandas._libs.tslibs.timestamps", "Timestamp"),
    ("pandas._libs.tslibs.timedeltas", "Timedelta"), ("pandas._libs.tslibs.nattype", "__nat_unpickle"),
    ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"), ("pandas._libs.missing", "NA"),
    ("pandas.core.arrays.datetimes", "DatetimeArray"), ("pandas.core.arrays.string_", "StringArray"),
    ("pandas.core.arrays.string_", "StringDtype"), ("pandas.core.arrays.string_arrow", "ArrowStringArray"),
    ("pandas.core.dtypes.dtypes", "CategoricalDtype"), ("pandas.core.arrays.categorical", "Categorical"),
    *(("pandas._libs.tslibs.offsets", n) for n in _OFFSETS),
    # pandas 3's default string columns/indexes are Arrow-backed: pyarrow's buffer and type reconstructors;
    # an array itself is rebuilt by _checked_arrow_array, never by pyarrow.lib._restore_array (see ARROW_ARRAY)
    ("pyarrow.lib", "py_buffer"), ("pyarrow.lib", "type_for_alias"),
})
"""``(module, name)`` pairs a frame artifact may reference: data reconstructors, never I/O (no ``read_pickle``)."""

ARROW_ARRAY = ("pyarrow.lib", "_restore_array")
"""pyarrow's array reconstructor: trusts the pickled length and offsets (10^9 values over an 8-byte buffer is
a segfault later), so a frame artifact's Arrow arrays are rebuilt by :func:`_checked_arrow_array` instead."""

_ARROW_STRING_TYPES = ("string", "large_string")
"""The Arrow types an artifact's array may have: what pandas' ``ArrowStringArray`` holds."""


class FrameUnpickler(AllowListUnpickler):
    """Resolves only :data:`FRAME_GLOBALS`."""

    allowed = FRAME_GLOBALS
    where = "an artifact read here"
    holds = "pandas/numpy data only"

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ARROW_ARRAY:
            return _checked_arrow_array
        return super().find_class(module, name)


def _checked_arrow_array(data: Any) -> Any:
    """An Arrow string array rebuilt from pickled ``ArrayData`` with its buffers checked against its length.

    Raises:
        pickle.UnpicklingError: not a flat string array, or buffers that do not hold what it claims.
    """
    import pickle

    import pyarrow as pa  # type: ignore[import-untyped]

    try:
        dtype, length, null_count, offset, buffers, children, dictionary = data
    except (TypeError, ValueError) as e:
        raise pickle.UnpicklingError(f"refused Arrow array: malformed array data ({e})") from e
    if not isinstance(dtype, pa.DataType) or str(dtype) not in _ARROW_STRING_TYPES or children or dictionary:
        raise pickle.UnpicklingError(f"refused Arrow array of type {dtype}: an artifact read here may hold "
                                     f"Arrow arrays of types {', '.join(_ARROW_STRING_TYPES)} only")
    try:
        array = pa.Array.from_buffers(dtype, int(length), list(buffers), int(null_count), int(offset))
        array.validate(full=True)  # sizes, offsets and UTF-8 checked before anything reads it
    except (pa.ArrowException, TypeError, ValueError) as e:
        raise pickle.UnpicklingError(f"refused Arrow array: its buffers do not hold what it claims ({e})") from e
    return array


def read_frame(path: str | Path) -> Any:
    """Unpickle a pandas/numpy artifact file (``pd.read_pickle`` without running code).

    Raises:
        TaskDecodeError: the file names a refused global or is not a valid pickle (the message names it).
    """
    try:
        with open(path, "rb") as fh:
            return FrameUnpickler(fh).load()
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken pickle raises anything from EOFError to TypeError
        raise TaskDecodeError(f"artifact {path} is not plain pandas/numpy data: {type(e).__name__}: {e}") from e



# ---------------------------------------------------------------------- the pool as the root of trust
SIGNAL_ARTIFACTS = ("pred.pkl", "label.pkl")
"""A training run's artifacts its train-once backtests read (their digests travel in the backtest task)."""


def digest_map(stored: Any) -> dict[str, str] | None:
    """``{artifact path: sha256}`` from the stored form (``[[path, sha256], ...]``: paths have dots, which a
    BSON key should not); None when nothing was stored (a run committed before digests were recorded)."""
    if stored is None:
        return None
    return {str(name): str(digest) for name, digest in stored}


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_digest(run_id: str, name: str, path: str | Path, digests: dict | None) -> None:
    """Refuse ``path`` (artifact ``name`` of run ``run_id``) unless its sha256 is the one the pool recorded.

    ``digests`` None means the run was committed before digests were recorded: nothing to check against
    (the file is then read as plain data only, as before).

    Raises:
        ArtifactTampered: the pool recorded another digest, or none for ``name``.
    """
    if digests is None:
        logger.debug("artifacts: run %s was committed without digests; %s read unverified", run_id, name)
        return
    want, have = digests.get(name), sha256_file(path)
    if want is None:
        raise ArtifactTampered(f"run {run_id}: artifact {name!r} was not written by the run's task (the pool "
                               f"records digests for {', '.join(sorted(digests)) or 'no file'}); not read")
    if have != want:
        raise ArtifactTampered(f"run {run_id}: artifact {name!r} has sha256 {have}, but the pool recorded {want} "
                               "when the run was committed: it was changed in the artifact store; not read")


def download_checked(client: Any, run_id: str, name: str, dst: str | Path, digests: dict | None) -> Path:
    """Download artifact ``name`` of ``run_id`` into ``dst`` and check it against the pool's ``digests``.

    Raises:
        ArtifactTampered: see :func:`check_digest`.
        Exception: whatever MLflow raises for a missing artifact.
    """
    path = Path(client.download_artifacts(run_id, name, str(dst)))
    check_digest(run_id, name, path, digests)
    return path


class ArtifactLedger:
    """The sha256 of every file a task's run uploads through its Qlib recorder, and the check of every file
    the recorder loads back (:meth:`guard`).

    One per task run, used by the task's thread only. The digests go into the committed outcome
    (``Outcome.ARTIFACTS``): from then on the pool, not the artifact store, says what the run's files are.
    The bytes of what it uploaded are kept too (up to ``memo_bytes`` in all): the run's own records load
    ``pred.pkl`` and the reports back several times, and those bytes are the ones hashed, so they need
    neither a download nor a check (issue 24: ~0.3 s a task).
    """

    def __init__(self, run_id: str, memo_bytes: int = defaults.LOADBACK_MEMO_BYTES):
        self.run_id = run_id
        self.digests: dict[str, str] = {}
        self._memo: dict[str, bytes] = {}
        self._memo_room = memo_bytes

    def stored(self) -> list[list[str]]:
        """The digests as stored in the pool: ``[[path, sha256], ...]`` sorted by path."""
        return [[name, self.digests[name]] for name in sorted(self.digests)]

    def add_file(self, path: str | Path, name: str) -> None:
        """Record the digest of local file ``path``, uploaded as artifact ``name`` (and its bytes, room left)."""
        self._memo_room += len(self._memo.pop(name, b""))
        if Path(path).stat().st_size > self._memo_room:
            self.digests[name] = sha256_file(path)
            return
        blob = Path(path).read_bytes()
        self.digests[name] = hashlib.sha256(blob).hexdigest()
        self._memo[name] = blob
        self._memo_room -= len(blob)

    def add_dir(self, local_dir: str | Path, artifact_path: str | None) -> None:
        """Record every file under ``local_dir``, uploaded under ``artifact_path``."""
        root = Path(local_dir)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            self.add_file(path, _joined(artifact_path, path.relative_to(root).as_posix()))

    def guard(self, recorder: Any) -> None:
        """Record what Qlib's ``recorder`` uploads, and check what it loads back: its client's
        ``log_artifact``/``log_artifacts`` hash each file once it is uploaded; its ``load_object`` unpickles
        only bytes whose digest this ledger recorded (read once: checked bytes are the bytes unpickled)."""
        client = recorder.client
        log_artifact, log_artifacts = client.log_artifact, client.log_artifacts

        def _log_artifact(run_id: str, local_path: str, artifact_path: str | None = None) -> None:
            log_artifact(run_id, local_path, artifact_path)
            if run_id == self.run_id:  # after the upload: a failed one leaves nothing to load back
                self.add_file(local_path, _joined(artifact_path, Path(local_path).name))

        def _log_artifacts(run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
            log_artifacts(run_id, local_dir, artifact_path)
            if run_id == self.run_id:
                self.add_dir(local_dir, artifact_path)

        client.log_artifact, client.log_artifacts = _log_artifact, _log_artifacts
        recorder.load_object = lambda name, unpickler=None: self.load(client, name, unpickler)

    def load(self, client: Any, name: str, unpickler: Any = None) -> Any:
        """Qlib's ``MLflowRecorder.load_object`` with the bytes checked against this ledger first (or the bytes
        this run uploaded, kept in memory).

        Raises:
            ArtifactTampered: the file is not the one this run uploaded.
            qlib.workflow.recorder.LoadObjectError: MLflow has no such file, or it does not unpickle.
        """
        import io
        import pickle

        from qlib.workflow.recorder import LoadObjectError

        blob = self._memo.get(name)
        if blob is None:
            blob = self._download(client, name)
        try:
            return (unpickler or pickle.Unpickler)(io.BytesIO(blob)).load()
        except Exception as e:
            raise LoadObjectError(str(e)) from e

    def _download(self, client: Any, name: str) -> bytes:
        import tempfile

        from qlib.workflow.recorder import LoadObjectError

        with tempfile.TemporaryDirectory(prefix="qlib-ext-load-") as tmp:
            try:
                path = Path(client.download_artifacts(self.run_id, name, tmp))
            except Exception as e:
                raise LoadObjectError(str(e)) from e
            blob = path.read_bytes()
        want, have = self.digests.get(name), hashlib.sha256(blob).hexdigest()
        if have != want:
            raise ArtifactTampered(f"run {self.run_id}: artifact {name!r} has sha256 {have}, but this run wrote "
                                   f"{want or 'no such file'}: it was changed in the artifact store; not read")
        return blob


def _joined(artifact_path: str | None, name: str) -> str:
    return f"{artifact_path.strip('/')}/{name}" if artifact_path else name

"""The Optuna storage of a sweep: Optuna's RDBStorage (optuna==5.0.0, pinned) with

- calls that survive a database restart: a call that loses its connection is retried with
  backoff for up to `outage_seconds` (Optuna's own storage raises at once, which would kill the
  worker and its trial); the engine's pre-ping replaces pooled connections that died;
- stale trials that include those that never recorded a heartbeat (`_stale_or_never_beat`);
- coalesced writes: what a thread writes inside `storage.coalesced()` (params, attributes,
  intermediate values, heartbeats, trial states) is one transaction, committed when the block
  ends or before the thread's next read (so that it reads its own writes);
- snapshots: inside `storage.snapshot()` a thread reads a study's trials from the database once,
  then only the trials made since (Optuna's cache re-reads every unfinished trial on each read:
  a population's prune checks and refills read them K times an epoch);
- unfinished trials read again only when it matters: Optuna's cache reads every unfinished
  trial in full (params, values, attributes, intermediate values) at every read: with W workers
  that is W trials per ask and per prune check, W^2 for the study (`make bench-scale-out`).
  Here one light query first reads each unfinished trial's state and counts of params and
  attributes; read in full are the new trials, those whose state or counts moved, and those this
  storage wrote to since it last read them (`_changed_since_read`). So another worker's running
  trial keeps the intermediate values it had when last read in full: no sampler or pruner of
  Optuna reads them (median and percentile compare complete trials, successive halving and
  hyperband their rung attributes, TPE and GP complete and pruned trials, and the params of
  running ones with constant_liar); a trial's own values are always current.

Optuna's public API has no batch writes, so the coalesced transaction is built from RDBStorage's
own `*_without_commit` helpers, its models and `_create_scoped_session`: private calls, whose
behaviour tests/test_storage.py checks against Optuna's own calls (it fails on an Optuna whose
private calls differ).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from mnist_sweep.errors import UserError
from mnist_sweep.urls import redact_reason, redact_uri

log = logging.getLogger("mnist_sweep")


class StorageUnavailable(UserError):
    """The study's database stayed unreachable for longer than the sweep waits."""


def _lost_connection(error: BaseException) -> bool:
    """A database error that a retry can cure: connection refused or dropped, server shutting
    down or starting up, SQLite busy. Not: bad SQL, constraint violations, wrong data."""
    import sqlalchemy.exc

    for e in (error, error.__cause__):
        if isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return True
        if isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated:
            return True
    return False


def _retrying(name: str, method: Callable) -> Callable:
    @functools.wraps(method)
    def call(self: ResilientRDBStorage, *args, **kwargs):
        deadline, delay = None, 0.5
        while True:
            try:
                return method(self, *args, **kwargs)
            except optuna.exceptions.UpdateFinishedTrialError:
                # A retried write whose first attempt did commit (the reply was lost): the trial
                # is already in the state we asked for. Anything else is a real error.
                if deadline is not None and name == "set_trial_state_values":
                    trial = RDBStorage.get_trial(self, args[0])
                    if trial.state == (kwargs.get("state") or args[1]):
                        return True
                raise
            except Exception as error:
                if not _lost_connection(error):
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.outage_seconds
                    log.warning(
                        f"Optuna storage unreachable ({name}): retrying for up to "
                        f"{self.outage_seconds:.0f} s"
                    )
                if now >= deadline:
                    reason = redact_reason(
                        " ".join(str(error.__cause__ or error).split()), self.url
                    )
                    raise StorageUnavailable(
                        f"The Optuna storage {redact_uri(self.url)} stayed unreachable for "
                        f"{self.outage_seconds:.0f} s (sweep.outage_seconds): {reason[:300]}. "
                        "The study is kept; run the same command again once the database is "
                        "back."
                    ) from None
                time.sleep(min(delay, max(deadline - now, 0.1)))
                delay = min(delay * 2, 8)

    return call


class ResilientRDBStorage(RDBStorage):
    """See the module's docstring."""

    outage_seconds: float = 120

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.first_seen_without_heartbeat: dict[int, float] = {}  # trial id -> time.monotonic()
        self.read_versions: dict[int, tuple] = {}  # unfinished trial id -> version when read
        self.writes = itertools.count()
        self.written: dict[int, int] = {}  # trial id -> the last write committed here to it
        self._local = threading.local()  # a thread's pending writes and snapshot
        self.transactions = 0  # coalesced transactions committed (for the benchmark)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_local", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._local = threading.local()

    # ------------------------------------------------------------------------- coalesced writes

    @contextmanager
    def coalesced(self) -> Iterator[None]:
        """This thread's writes inside are one transaction (nested blocks join the outer one).
        Written at the end of the block, also when it raises: what was recorded before an error
        is kept. A write the database refuses surfaces there, not at the call."""
        if getattr(self._local, "pending", None) is not None:
            yield
            return
        self._local.pending = []
        try:
            yield
        finally:
            pending, self._local.pending = self._local.pending, []
            try:
                self._commit(pending)
            finally:
                self._local.pending = None

    def _queued(self, operation: tuple) -> bool:
        pending = getattr(self._local, "pending", None)
        if pending is None:
            return False
        pending.append(operation)
        return True

    def _commit_pending(self) -> None:
        """Before a read inside a coalesced block: the thread reads its own writes."""
        pending = getattr(self._local, "pending", None)
        if pending:
            self._local.pending = []
            self._commit(pending)

    def _commit(self, operations: list[tuple]) -> None:
        if operations:
            _retrying("coalesced writes", ResilientRDBStorage._write_all)(self, operations)

    def _write_all(self, operations: list[tuple]) -> None:
        import sqlalchemy.exc
        from optuna.storages._rdb.storage import _create_scoped_session

        try:
            with _create_scoped_session(self.scoped_session) as session:
                for operation in operations:
                    try:
                        self._apply(session, *operation)
                    except optuna.exceptions.UpdateFinishedTrialError as error:
                        # the trial ended meanwhile (a heartbeat check failed it): its late write
                        # is dropped, as Optuna's own write would have been refused
                        log.debug(f"dropped a write to a finished trial: {error}")
            self.transactions += 1
            self._mark_written(operations)
        except sqlalchemy.exc.IntegrityError:
            # another process wrote a row with the same key meanwhile: each write on its own,
            # as Optuna makes them (which ignores such a race)
            for operation in operations:
                try:
                    self._apply_alone(*operation)
                except optuna.exceptions.UpdateFinishedTrialError:
                    pass

    def _mark_written(self, operations) -> None:
        """Trials written to (committed): read in full at this storage's next read."""
        for kind, trial_id, *_ in operations:
            if kind != "heartbeat":
                self.written[trial_id] = next(self.writes)

    def _apply(self, session, kind: str, *args) -> None:
        from optuna.storages._rdb import models

        if kind == "param":
            self._set_trial_param_without_commit(session, *args)
        elif kind in ("user_attr", "system_attr"):
            model = (
                models.TrialUserAttributeModel
                if kind == "user_attr"
                else models.TrialSystemAttributeModel
            )
            self._set_trial_attr_without_commit(session, model, *args)
        elif kind == "intermediate":
            self._set_trial_intermediate_value_without_commit(session, *args)
        elif kind == "heartbeat":
            self._record_heartbeat_without_commit(session, *args)
        elif kind == "state":
            self._set_trial_state_values_without_commit(session, *args)
        else:
            raise ValueError(kind)

    def _apply_alone(self, kind: str, *args) -> None:
        if kind == "param" and len(args) == 5:  # queued by _set_trial_param (cached distribution)
            RDBStorage._set_trial_param(self, *args)
        elif kind == "param":
            RDBStorage.set_trial_param(self, *args)
        elif kind == "user_attr":
            RDBStorage.set_trial_user_attr(self, *args)
        elif kind == "system_attr":
            RDBStorage.set_trial_system_attr(self, *args)
        elif kind == "intermediate":
            RDBStorage.set_trial_intermediate_value(self, *args)
        elif kind == "heartbeat":
            RDBStorage.record_heartbeat(self, *args)
        elif kind == "state":
            RDBStorage.set_trial_state_values(self, *args)

    @staticmethod
    def _record_heartbeat_without_commit(session, trial_id: int) -> None:
        """RDBStorage.record_heartbeat's body, inside the coalesced transaction."""
        import sqlalchemy
        from optuna.storages._rdb import models

        heartbeat = models.TrialHeartbeatModel.where_trial_id(trial_id, session)
        if heartbeat is None:
            session.add(models.TrialHeartbeatModel(trial_id=trial_id))
        else:
            heartbeat.heartbeat = session.execute(sqlalchemy.func.now()).scalar()

    def _set_trial_state_values_without_commit(
        self, session, trial_id: int, state: TrialState, values=None
    ) -> None:
        """RDBStorage.set_trial_state_values' body for a finished state, inside the coalesced
        transaction."""
        from datetime import datetime

        from optuna.storages._rdb import models

        trial = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
        self.check_trial_is_updatable(trial_id, trial.state)
        for objective, value in enumerate(values or ()):
            self._set_trial_value_without_commit(session, trial, objective, value)
        trial.state = state
        if state.is_finished():
            trial.datetime_complete = datetime.now()

    # ------------------------------------------------------------------------- snapshots

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Inside, this thread reads each study's trials from the database once; later reads
        fetch only the trials made since (by any process), not every unfinished trial again
        (Optuna's cache re-reads them all on each read: a population's prune checks and refills
        read K trials K times an epoch). For decisions that look at one moment: a population's
        prune checks, a refill's budget and sampling. A trial made since is seen at once, so
        a count of the trials before a new one is exact for them, and at worst counts an old
        trial that has failed meanwhile: it errs towards a full budget, never past it."""
        if getattr(self._local, "snapshot", None) is not None:
            yield
            return
        self._local.snapshot = {}  # study id -> the highest trial id read
        try:
            yield
        finally:
            self._local.snapshot = None

    def _get_trials(
        self, study_id: int, states, included_trial_ids: set[int], trial_id_greater_than: int
    ):
        snapshot = getattr(self._local, "snapshot", None)
        written: dict[int, int] = {}
        if snapshot is not None and study_id in snapshot:
            included_trial_ids = set()
            trial_id_greater_than = max(trial_id_greater_than, snapshot[study_id])
        elif states is None and included_trial_ids:  # the cache's refresh of unfinished trials
            # The cache asks for its unfinished trials and every trial after the last finished
            # one: nearly all running trials are after it (they finish in about the order they
            # started). Every trial up to the newest it holds is in the cache, finished or in
            # `included_trial_ids`: read in full the new ones and the unfinished that changed.
            written = dict(self.written)
            changed = _retrying("_changed_since_read", _changed_since_read)(
                self, included_trial_ids
            )
            trial_id_greater_than = max(trial_id_greater_than, *included_trial_ids)
            included_trial_ids = changed | (included_trial_ids & written.keys())
        self._commit_pending()
        trials = _retrying("_get_trials", RDBStorage._get_trials)(
            self, study_id, states, included_trial_ids, trial_id_greater_than
        )
        for trial in trials:
            if trial.state.is_finished():
                self.read_versions.pop(trial._trial_id, None)
            else:
                self.read_versions[trial._trial_id] = _version(trial)
            if written.get(trial._trial_id, -1) == self.written.get(trial._trial_id):
                del self.written[trial._trial_id]  # read since its last write (none during)
        if snapshot is not None:
            snapshot[study_id] = max(
                [trial_id_greater_than, snapshot.get(study_id, -1), *(t._trial_id for t in trials)]
            )
        return trials


# Writes: queued inside a coalesced block, else made at once (retried on a lost connection).
_WRITES = {
    "set_trial_param": "param",
    "_set_trial_param": "param",
    "set_trial_user_attr": "user_attr",
    "set_trial_system_attr": "system_attr",
    "set_trial_intermediate_value": "intermediate",
    "record_heartbeat": "heartbeat",
    "set_trial_state_values": "state",
}
# Everything else that reaches the database: the thread's pending writes first, then retried.
_READS_AND_OTHER_WRITES = (
    "create_new_study",
    "delete_study",
    "set_study_user_attr",
    "set_study_system_attr",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_trial_user_attrs",
    "get_trial_system_attrs",
    "get_all_studies",
    "create_new_trial",
    "get_trial_param",
    "get_trial_id_from_study_id_trial_number",
    "get_trial",
    "get_all_trials",
    "get_best_trial",
    "get_n_trials",
    # what Optuna's _CachedStorage (which wraps every RDBStorage) calls directly:
    "_create_new_trial",
    "_get_best_trial_id",
)


def _write(name: str, kind: str) -> Callable:
    method = getattr(RDBStorage, name)
    signature = inspect.signature(method)

    @functools.wraps(method)
    def call(self: ResilientRDBStorage, *args, **kwargs):
        # Optuna passes some by keyword: queued in the order the *_without_commit helpers take
        args = signature.bind(self, *args, **kwargs).args[1:]
        claims = kind == "state" and args[1] == TrialState.RUNNING  # its answer is needed now
        if not claims and self._queued((kind, *args)):
            return True if kind == "state" else None
        self._commit_pending()
        try:
            return method(self, *args)
        finally:
            self._mark_written([(kind, *args)])

    return _retrying(name, call)


def _first_writes_pending(name: str) -> Callable:
    method = getattr(RDBStorage, name)

    @functools.wraps(method)
    def call(self: ResilientRDBStorage, *args, **kwargs):
        self._commit_pending()
        return method(self, *args, **kwargs)

    return _retrying(name, call)


for _name, _kind in _WRITES.items():
    setattr(ResilientRDBStorage, _name, _write(_name, _kind))
for _name in _READS_AND_OTHER_WRITES:
    setattr(ResilientRDBStorage, _name, _first_writes_pending(_name))


def _version(trial: optuna.trial.FrozenTrial) -> tuple:
    """What a light read of a trial tells apart: its state and how many params and attributes it
    has. Optuna never rewrites a param or a finished trial; this tool sets each user and system
    attribute once (Optuna's rungs too); so a change adds a row or moves the state."""
    return (trial.state.name, len(trial.params), len(trial.user_attrs), len(trial.system_attrs))


def _changed_since_read(storage: ResilientRDBStorage, trial_ids: set[int]) -> set[int]:
    """Of the unfinished trials the cache holds (`trial_ids`), those whose state or counts differ
    from when this storage last read them: one query of W small rows instead of W trials with
    all their rows."""
    import sqlalchemy
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    unknown = {i for i in trial_ids if i not in storage.read_versions}
    known = trial_ids - unknown
    if not known:
        return trial_ids
    trial = models.TrialModel

    def rows_of(model) -> Any:
        return (
            sqlalchemy.select(sqlalchemy.func.count())
            .where(model.trial_id == trial.trial_id)
            .scalar_subquery()
        )

    query = sqlalchemy.select(
        trial.trial_id,
        trial.state,
        rows_of(models.TrialParamModel),
        rows_of(models.TrialUserAttributeModel),
        rows_of(models.TrialSystemAttributeModel),
    ).where(trial.trial_id.in_(known))
    with _create_scoped_session(storage.scoped_session) as session:
        now = {row[0]: (row[1].name, *row[2:]) for row in session.execute(query)}
    return unknown | {i for i in known if now.get(i) != storage.read_versions[i]}


def _stale_or_never_beat(storage: ResilientRDBStorage, study_id: int) -> list[int]:
    """Optuna's stale trials (last heartbeat older than the grace period), plus the RUNNING trials
    that have never recorded a heartbeat and still have none a grace period after this storage
    first saw them so. Optuna skips a trial without a heartbeat row: it creates the trial in one
    transaction and records the first beat later, from the heartbeat thread, so a worker killed
    in between left a trial RUNNING that no process would ever fail, and a sweep that counted it
    as running waited for it forever (a kill -9 resume under load did). Measured from when this
    process saw it, not from its datetime_start: that is another machine's local clock."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    storage._commit_pending()
    stale = RDBStorage._get_stale_trial_ids(storage, study_id)
    with _create_scoped_session(storage.scoped_session) as session:
        never_beat = {
            trial_id
            for (trial_id,) in session.query(models.TrialModel.trial_id)
            .outerjoin(models.TrialHeartbeatModel)
            .filter(
                models.TrialModel.study_id == study_id,
                models.TrialModel.state == TrialState.RUNNING,
                models.TrialHeartbeatModel.trial_heartbeat_id.is_(None),
            )
        }
    grace = storage.grace_period or 2 * storage.heartbeat_interval
    now, seen = time.monotonic(), storage.first_seen_without_heartbeat
    for trial_id in set(seen) - never_beat:
        del seen[trial_id]
    dead = [
        trial_id for trial_id in sorted(never_beat) if now - seen.setdefault(trial_id, now) > grace
    ]
    for trial_id in dead:  # failed now, by this process or another one
        del seen[trial_id]
    return stale + dead


ResilientRDBStorage._get_stale_trial_ids = _retrying("_get_stale_trial_ids", _stale_or_never_beat)

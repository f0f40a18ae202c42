"""The Optuna storage of a sweep: Optuna's RDBStorage (optuna==5.0.0, pinned) with

- calls that survive a database restart: a call that loses its connection is retried with
  backoff for up to `outage_seconds` (Optuna's own storage raises at once, which would kill the
  worker and its trial); the engine's pre-ping replaces pooled connections that died;
- stale trials that include those that never recorded a heartbeat (`_stale_or_never_beat`),
  handed out a few at a time, chosen at random (`stale_rounds`);
- coalesced writes: what a thread writes inside `storage.coalesced()` (params, attributes,
  intermediate values, heartbeats, trial states) is one transaction, committed when the block
  ends or before the thread's next read (so that it reads its own writes);
- snapshots: inside `storage.snapshot()` a thread reads a study's trials from the database once,
  then only the trials made since (Optuna's cache re-reads every unfinished trial on each read:
  a population's prune checks and refills read them K times an epoch);
- other workers' running trials read light: Optuna's cache reads every unfinished trial in full
  (params, values, attributes, intermediate values) at every read, so with W workers each ask and
  each prune check reads W trials, and every write anywhere makes every worker read that trial
  again (`make bench-scale-out`: 1,000 workers never got past their first trials). Here a read
  is one light row per trial (state and counts); another worker's running trial is kept as a
  light copy (number, state, start) and read in full once it has finished, or when it holds
  system attributes (a retry's history, a rung); this worker's own trials are read in full
  after its writes (`_refresh`). No Optuna sampler or pruner reads other workers' running
  trials' params or values, except a constant liar (`sampler_args: {constant_liar: true}`), for
  which they are read in full; the reads outside any transaction (`read_sessions`).

Optuna's public API has no batch writes, so the coalesced transaction is built from RDBStorage's
own `*_without_commit` helpers, its models and `_create_scoped_session`: private calls, whose
behaviour tests/test_storage.py checks against Optuna's own calls (it fails on an Optuna whose
private calls differ).
"""

from __future__ import annotations

import copy
import datetime
import functools
import inspect
import itertools
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from mnist_sweep.base.errors import UserError
from mnist_sweep.base.urls import redact_reason, redact_uri

log = logging.getLogger("mnist_sweep")

# Stale trials a worker fails and retries in one round of its check (see stale_rounds): few
# enough that a round is short under load, so that the workers checking at once share them.
STALE_A_ROUND = 8


class StorageUnavailable(UserError):
    """The study's database stayed unreachable for longer than the sweep waits."""


def _lost_connection(error: BaseException) -> bool:
    """A database error that a retry can cure: connection refused or dropped, server shutting
    down or starting up, SQLite busy. Not: bad SQL, constraint violations, wrong data."""
    import sqlalchemy.exc

    # down the chain of causes: Optuna wraps errors in StorageInternalError, and a read it
    # tries again in the same session after a dropped connection raises PendingRollbackError,
    # whose context is the OperationalError
    e: BaseException | None = error
    seen = 0
    while e is not None and seen < 5:
        if isinstance(e, StorageUnavailable):  # a retry has given up already: final
            return False
        if isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return True
        if isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _retrying(name: str, method: Callable) -> Callable:
    """`method`, retried on a lost connection for up to `outage_seconds`, at one boundary: the
    outermost retrying call of the thread. Calls made inside it (Optuna's set_trial_param calls
    _set_trial_param, get_best_trial calls get_trial, a read commits the pending writes first)
    are not retried on their own: their error reaches the outer call, which runs again whole.
    Retries nested in retries waited a full `outage_seconds` each, so a store that stayed down
    was reported after a multiple of it."""

    @functools.wraps(method)
    def call(self: ResilientRDBStorage, *args, **kwargs):
        if getattr(self._local, "retrying", False):  # the outer call retries
            return method(self, *args, **kwargs)
        self._local.retrying = True
        started = time.monotonic()
        try:
            result = retried(self, *args, **kwargs)
        finally:
            self._local.retrying = False
            if self.reachable_since == math.inf:  # given up, or failed otherwise, mid-outage:
                self.reachable_since = time.monotonic()  # stale checks resume a grace later
        # A call that took longer than a heartbeat interval was an outage too, one that a pooler
        # hid by queueing the call (PgBouncer holds it until PostgreSQL is back): no worker could
        # beat meanwhile either
        if self.heartbeat_interval and time.monotonic() - started > self.heartbeat_interval:
            self.reachable_since = time.monotonic()
        return result

    def retried(self: ResilientRDBStorage, *args, **kwargs):
        deadline, delay = None, 0.5
        while True:
            try:
                result = method(self, *args, **kwargs)
                if deadline is not None:  # the store is back after an outage seen here
                    self.reachable_since = time.monotonic()
                return result
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
                # this thread's sessions may hold the dead connection in a transaction (the next
                # use would raise PendingRollbackError): the retry starts from fresh ones
                for sessions in {
                    id(s): s for s in (self.scoped_session, self.read_sessions)
                }.values():
                    try:
                        sessions.remove()
                    except Exception:  # closing over a dead connection: it is dropped anyway
                        pass
                now = time.monotonic()
                self.reachable_since = math.inf  # no stale check until it is back (see there)
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
        # a cache's id -> {unfinished trial id: its version when read} (see _refresh)
        self.read_versions: dict[int, dict[int, tuple]] = {}
        self.light_running = True  # others' running trials read light (see _refresh)
        self.writes = itertools.count()
        self.written: dict[int, int] = {}  # trial id -> the last write committed here to it
        # trials this storage made or claimed RUNNING and has not ended: its worker's heartbeat
        # round beats them from their first moment (an ask samples after making the trial)
        self.running_here: set[int] = set()
        # trials of this storage's writes that had ended meanwhile (see _refused)
        self.ended_elsewhere: set[int] = set()
        # when the store was last seen back after an outage here (see _get_stale_trial_ids)
        self.reachable_since = -math.inf
        self._local = threading.local()  # a thread's pending writes and snapshot
        self.transactions = 0  # coalesced transactions committed (for the benchmark)
        self.light_rows = 0  # rows the light reads returned (for tests and the benchmark)
        self._open_read_sessions()

    def _open_read_sessions(self) -> None:
        """Sessions for the large reads (a study's trials), outside any transaction on
        PostgreSQL. Optuna's read is 6 statements (trials, then their params, values, attributes
        and intermediate values) with the building of Python objects in between; inside one
        transaction a busy worker holds a server connection for all of it, and through
        PgBouncer's transaction pooling 15 connections then serve few workers. PostgreSQL's READ
        COMMITTED gives each statement its own snapshot anyway, so nothing changes but that."""
        import sqlalchemy.orm

        if self.engine.dialect.name != "postgresql":
            self.read_sessions = self.scoped_session
            return
        reads = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self.read_sessions = sqlalchemy.orm.scoped_session(sqlalchemy.orm.sessionmaker(bind=reads))

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_local", None)
        state.pop("read_sessions", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._local = threading.local()
        self._open_read_sessions()

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
        """Before a read inside a coalesced block: the thread reads its own writes. They stay
        pending until committed: a call that fails here is retried whole, writes included."""
        pending = getattr(self._local, "pending", None)
        if pending:
            self._commit(pending)
            self._local.pending = []

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
                        self._refused(operation, error, operations, session)
            self.transactions += 1
            self._mark_written(operations)
        except sqlalchemy.exc.IntegrityError:
            # another process wrote a row with the same key meanwhile: each write on its own,
            # as Optuna makes them (which ignores such a race)
            for operation in operations:
                try:
                    self._apply_alone(*operation)
                except optuna.exceptions.UpdateFinishedTrialError as error:
                    self._refused(operation, error, operations)
            self._mark_written(operations)  # a finished state ends the trial's beats here too

    def _refused(
        self, operation: tuple, error: Exception, operations: list[tuple], session: Any = None
    ) -> None:
        """A write to a trial that had ended is refused, as Optuna's own write would be, and the
        rest of the transaction goes on. Either the end is ours: these writes were committed by
        an attempt whose reply was lost (the retry, or the one-by-one fallback, applies them
        again), and the trial holds the finished state this batch writes; or another process
        ended it (its stale check failed it while it trained). That trial is remembered
        (`ended_elsewhere`): its worker learns it at its next report and stops training it,
        and its MLflow run ends FAILED saying why (bookkeeping.py), so that Optuna and MLflow
        never disagree. The state is read in the transaction's own session: another session
        here would commit this thread's half-done transaction (Optuna's scoped session)."""
        from optuna.storages._rdb import models

        trial_id = operation[1]
        ours = {
            op[1]: op[2]
            for op in operations
            if op[0] == "state" and len(op) > 2 and getattr(op[2], "is_finished", lambda: 0)()
        }
        if trial_id in ours:
            state: Any = (
                models.TrialModel.find_or_raise_by_id(trial_id, session).state
                if session is not None
                else RDBStorage.get_trial(self, trial_id).state
            )
            if state == ours[trial_id]:
                return  # our own end, committed already
        if trial_id not in self.ended_elsewhere:
            log.warning(f"trial id {trial_id} had ended elsewhere: {error}")
        self.ended_elsewhere.add(trial_id)

    def _mark_written(self, operations) -> None:
        """Trials written to (committed): each cache reads them in full at its next read. A
        finished state (written, or refused because the trial had ended) ends its beats."""
        for kind, trial_id, *rest in operations:
            if kind == "state" and rest[0].is_finished():
                self.running_here.discard(trial_id)
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
        """What RDBStorage.record_heartbeat does, inside the coalesced transaction, in one
        statement where Optuna makes three (read the row, read now(), update): with W workers
        there are W / heartbeat_interval beats a second, the most frequent write of a sweep at
        scale. The time is the database's, as Optuna's (and the row's default when inserted)."""
        import sqlalchemy
        from optuna.storages._rdb import models

        beats = models.TrialHeartbeatModel
        updated = session.execute(
            sqlalchemy.update(beats)
            .where(beats.trial_id == trial_id)
            .values(heartbeat=sqlalchemy.func.now())
            .execution_options(synchronize_session=False)
        )
        if updated.rowcount == 0:
            session.add(beats(trial_id=trial_id))

    def _set_trial_state_values_without_commit(
        self, session, trial_id: int, state: TrialState, values=None
    ) -> None:
        """RDBStorage.set_trial_state_values' body for a finished state, inside the coalesced
        transaction."""
        from datetime import datetime

        from optuna.storages._rdb import models

        trial = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
        # the loaded column holds a TrialState (SQLAlchemy's Column typing cannot say so)
        self.check_trial_is_updatable(trial_id, cast(TrialState, trial.state))
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

    # ------------------------------------------------------------------------- stale trials

    @contextmanager
    def stale_rounds(self) -> Iterator[Callable[[], bool]]:
        """Optuna's `fail_stale_trials` fails every stale trial it is given, one transaction
        each, and only then runs their callbacks (the retry, the end of the MLflow run). When a
        process of 100 workers died under 1,000-worker load, one surviving worker failed,
        retried and ended the runs of all 100, one after another, at seconds a call: the
        retries trickled in over 20 minutes. Inside this block each round is given at most
        `STALE_A_ROUND` of them, chosen at random, so that the workers that check at once share
        them; the callbacks may defer their slow part (`after_stale_rounds`) to the block's
        end, once every retry is in. Yields `more()`: whether the last round left some."""
        self._local.stale_round_left = False
        self._local.after_stale = []
        try:
            yield lambda: bool(self._local.stale_round_left)
        finally:
            deferred, self._local.after_stale = self._local.after_stale, None
            self._local.stale_round_left = None
            for call in deferred:
                call()

    def after_stale_rounds(self, call: Callable[[], None]) -> None:
        """`call` at the end of this thread's `stale_rounds` block; at once outside one."""
        deferred = getattr(self._local, "after_stale", None)
        if deferred is None:
            call()
        else:
            deferred.append(call)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        """Optuna's stale trials (see `_stale_or_never_beat`), but none while this process has
        seen the store down (a call failing, or held longer than a heartbeat interval), nor for a
        grace period after it came back: during an outage no
        worker can beat, so every trial in flight looks stale to the first check after it,
        though their workers live and beat again within a heartbeat interval of its end. An
        outage shorter than `outage_seconds` so fails no live trial; a worker that died during
        it has its trials failed a grace period after the store is back."""
        stale = _retrying("_get_stale_trial_ids", _stale_or_never_beat)(self, study_id)
        assert self.heartbeat_interval is not None  # open_storage always sets one
        grace = self.grace_period or 2 * self.heartbeat_interval
        if time.monotonic() - self.reachable_since < grace:
            if stale:
                log.info(
                    f"{len(stale)} trial(s) look stale, but the store was down a moment "
                    "ago: their workers get a grace period to beat again"
                )
            stale = []
        if getattr(self._local, "stale_round_left", None) is not None:  # in stale_rounds
            self._local.stale_round_left = len(stale) > STALE_A_ROUND
            if len(stale) > STALE_A_ROUND:
                stale = random.sample(stale, STALE_A_ROUND)
        for trial_id in stale:  # failed now, by this process or another one
            self.first_seen_without_heartbeat.pop(trial_id, None)
        return stale

    def get_all_trials(self, study_id: int, deepcopy: bool = True, states=None) -> list:
        """Every trial in full, for callers without Optuna's cache (study summaries, a plain
        load): never the cache's light refresh, whose record of what was read is the cache's."""
        self._commit_pending()
        trials = _retrying("get_all_trials", _read_trials)(self, study_id, states, set(), -1)
        return copy.deepcopy(trials) if deepcopy else trials

    def _get_trials(
        self, study_id: int, states, included_trial_ids: set[int], trial_id_greater_than: int
    ):
        snapshot = getattr(self._local, "snapshot", None)
        if snapshot is not None and study_id in snapshot:
            included_trial_ids = set()
            trial_id_greater_than = max(trial_id_greater_than, snapshot[study_id])
        self._commit_pending()
        if states is None:  # the cache's refresh: the trials it holds unfinished, and new ones
            trials = _retrying("_refresh", _refresh)(
                self, study_id, included_trial_ids, trial_id_greater_than
            )
        else:
            trials = _retrying("_get_trials", _read_trials)(
                self, study_id, states, included_trial_ids, trial_id_greater_than
            )
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
    "get_trial_param",
    "get_trial_id_from_study_id_trial_number",
    "get_trial",
    "get_best_trial",
    "get_n_trials",
    # what Optuna's _CachedStorage (which wraps every RDBStorage) calls directly:
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
            done = method(self, *args)
            if claims and done:  # a waiting trial, ours now
                self.running_here.add(args[0])
            return done
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


def _creating(name: str) -> Callable:
    """create_new_trial (a trial id) and _create_new_trial (a FrozenTrial), which Optuna's
    cache calls: a new RUNNING trial is this storage's to beat from now on."""
    method = getattr(RDBStorage, name)

    @functools.wraps(method)
    def call(self: ResilientRDBStorage, study_id: int, template_trial=None):
        self._commit_pending()
        made = method(self, study_id, template_trial)
        running = template_trial is None or template_trial.state == TrialState.RUNNING
        if running:
            self.running_here.add(made if isinstance(made, int) else made._trial_id)
        return made

    return _retrying(name, call)


for _name, _kind in _WRITES.items():
    setattr(ResilientRDBStorage, _name, _write(_name, _kind))
for _name in _READS_AND_OTHER_WRITES:
    setattr(ResilientRDBStorage, _name, _first_writes_pending(_name))
for _name in ("create_new_trial", "_create_new_trial"):
    setattr(ResilientRDBStorage, _name, _creating(_name))


class _ReadView:
    """A storage as RDBStorage's read methods see it, with the read sessions as its sessions."""

    def __init__(self, storage: ResilientRDBStorage) -> None:
        self._storage, self.scoped_session = storage, storage.read_sessions

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


def _read_trials(storage: ResilientRDBStorage, *args) -> list:
    """RDBStorage._get_trials, in the read sessions."""
    return RDBStorage._get_trials(cast(RDBStorage, _ReadView(storage)), *args)  # duck-typed


def _version(trial: FrozenTrial, light_running: bool) -> tuple:
    """What the light read of a trial tells apart (see `_refresh`): its state and how many
    system attributes it has, and (constant liar) params and user attributes. Optuna never
    rewrites a param or a finished trial; this tool sets each attribute once (Optuna's rungs
    too); so a change adds a row or moves the state."""
    counts = [len(trial.system_attrs)]
    if not light_running:
        counts += [len(trial.params), len(trial.user_attrs)]
    return (trial.state.name, *counts)


def _refresh(
    storage: ResilientRDBStorage, study_id: int, unfinished: set[int], last_finished: int
) -> list[FrozenTrial]:
    """What Optuna's cache asks for (its unfinished trials, and every trial after the last
    finished one), read light first: one row per trial with its state and counts. Then: held
    by this cache and unchanged since it read it (state, counts, this storage's last write to
    it): not returned; finished, holding system attributes (a retry's history, a rung), or
    written by this storage: read in full; another worker's running trial: a light copy (state,
    number, start; no params or attributes), unless `storage.light_running` is off (constant
    liar). So each worker reads each other worker's trial in full once, when it has finished."""
    written = dict(storage.written)
    # What each cache holds, by the cache (its set of unfinished trials): Optuna makes more than
    # one over a storage (a study's, and a passing one for study summaries).
    if len(storage.read_versions) > 16:
        storage.read_versions = {
            k: v for k, v in storage.read_versions.items() if k == id(unfinished)
        }
    versions = storage.read_versions.setdefault(id(unfinished), {})
    # The running trials this cache holds as they are (no system attribute, no write here since
    # it read them) are left out by the query itself: at W workers each read would otherwise
    # return W rows only to skip them. Still returned if they have finished or gained one.
    unchanged = []
    if storage.light_running:
        unchanged = [i for i in unfinished if versions.get(i) == ("RUNNING", 0, written.get(i, -1))]
    rows = _light_rows(storage, study_id, unfinished, last_finished, unchanged)
    full, light = set(), []
    newest = max([last_finished, *unchanged, *(row[0] for row in rows)])
    for trial_id, number, state, started, *counts in rows:
        version = (state.name, *counts, written.get(trial_id, -1))
        if trial_id in unfinished and versions.get(trial_id) == version:
            continue  # the cache holds it as it is
        if state.is_finished() or counts[0] or trial_id in written or not storage.light_running:
            full.add(trial_id)
        else:
            versions[trial_id] = version
            light.append(_light_copy(trial_id, number, state, started))
    trials = []
    if full:
        trials = _read_trials(storage, study_id, None, full, newest)
        trials = [t for t in trials if t._trial_id in full]  # not those made since the light read
    for t in trials:
        if t.state.is_finished():
            versions.pop(t._trial_id, None)
        else:  # the write counter as it was before the read: a write during it reads it again
            versions[t._trial_id] = (
                *_version(t, storage.light_running),
                written.get(t._trial_id, -1),
            )
    return sorted([*trials, *light], key=lambda t: t._trial_id)


def _light_rows(
    storage: ResilientRDBStorage,
    study_id: int,
    unfinished: set[int],
    last_finished: int,
    unchanged: list[int],
) -> list:
    """One row per trial the cache asks for (trial id, number, state, start, then the counts
    that tell a change), but none for the `unchanged` ones still running without a system
    attribute."""
    import sqlalchemy
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    trial = models.TrialModel

    def count(model) -> Any:
        return (
            sqlalchemy.select(sqlalchemy.func.count())
            .where(model.trial_id == trial.trial_id)
            .scalar_subquery()
        )

    # a change that matters: the state, system attributes, and (constant liar) params and user
    # attributes; this storage's own writes it knows
    counted: list[Any] = [models.TrialSystemAttributeModel]
    if not storage.light_running:
        counted += [models.TrialParamModel, models.TrialUserAttributeModel]
    query = sqlalchemy.select(
        trial.trial_id,
        trial.number,
        trial.state,
        trial._datetime_start_utc,  # as Optuna stores it: UTC
        *(count(model) for model in counted),
    ).where(trial.study_id == study_id)
    wanted = trial.trial_id > last_finished
    known = [i for i in unfinished if i <= last_finished]
    if known:
        wanted = sqlalchemy.or_(_among(storage, trial.trial_id, "known", known), wanted)
    if unchanged:
        attributes = models.TrialSystemAttributeModel
        as_read = sqlalchemy.and_(
            _among(storage, trial.trial_id, "unchanged", unchanged),
            trial.state == TrialState.RUNNING,
            ~sqlalchemy.exists().where(attributes.trial_id == trial.trial_id),
        )
        wanted = sqlalchemy.and_(wanted, sqlalchemy.not_(as_read))
    with _create_scoped_session(storage.read_sessions) as session:
        rows = session.execute(query.where(wanted)).all()
    storage.light_rows += len(rows)
    return list(rows)


def _light_copy(trial_id: int, number: int, state: TrialState, started) -> FrozenTrial:
    """Another worker's running trial as a sampler or pruner sees it: number, state, start."""
    return FrozenTrial(
        number=number,
        state=state,
        value=None,
        # what TrialModel.datetime_start gives: the local time
        datetime_start=started
        and started.replace(tzinfo=datetime.UTC).astimezone().replace(tzinfo=None),
        datetime_complete=None,
        params={},
        distributions={},
        user_attrs={},
        system_attrs={},
        intermediate_values={},
        trial_id=trial_id,
    )


def _among(storage: ResilientRDBStorage, column, name: str, ids: list[int]) -> Any:
    """`column IN ids`; on PostgreSQL as one array parameter (`= ANY(:name)`), where an IN list
    would build one bound parameter per id at every read."""
    import sqlalchemy

    if storage.engine.dialect.name != "postgresql":
        return column.in_(ids)
    from sqlalchemy.dialects.postgresql import ARRAY

    return column == sqlalchemy.any_(
        sqlalchemy.bindparam(name, ids, type_=ARRAY(sqlalchemy.Integer))
    )


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
    assert storage.heartbeat_interval is not None  # open_storage always sets one
    grace = storage.grace_period or 2 * storage.heartbeat_interval
    now, seen = time.monotonic(), storage.first_seen_without_heartbeat
    for trial_id in set(seen) - never_beat:
        del seen[trial_id]
    dead = [
        trial_id for trial_id in sorted(never_beat) if now - seen.setdefault(trial_id, now) > grace
    ]
    return stale + dead

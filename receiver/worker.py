"""Durable jobs: submit, download, reconcile and deadline, claimed as due rows from the `jobs` table.

A job is a row; retries are data (attempts, due_at), not control flow. The loop wakes when a job is
added or the next one falls due, claims as many as each kind has free slots, and runs them. A crash
leaves rows behind, and the next start runs them again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable
from collections.abc import Callable
from dataclasses import replace

import httpx

from receiver import USER_AGENT
from receiver import metrics
from receiver.config import Settings
from receiver.downloads import DownloadError
from receiver.fetcher import open_fetcher
from receiver.intake import StoredImage
from receiver.logs import event
from receiver.logs import url_host
from receiver.media import Media
from receiver.media import MediaError
from receiver.models import OUTCOME_UNKNOWN
from receiver.models import ErrorCode
from receiver.models import Outcome
from receiver.models import ProviderRejected
from receiver.models import ProviderUnavailable
from receiver.models import Status
from receiver.models import Submission
from receiver.models import TaskError
from receiver.pacing import Limits
from receiver.pacing import Pacer
from receiver.providers import REGISTRY
from receiver.providers import Context
from receiver.providers import Provider
from receiver.store import DownloadTarget
from receiver.store import Job
from receiver.store import Store
from receiver.store import StoreUnavailable
from receiver.store import TaskRecord
from receiver.store import timed_out
from receiver.tasks import task_spec
from receiver.tasks import uploads_of
from receiver.tokens import Tokens

log = logging.getLogger("receiver.worker")
MAX_PROVIDER_ANSWER = 4 * 1024 * 1024
MAX_RECONCILE_INTERVAL = 600.0
MAX_STATUS_HOPS = 3
INBOX_SLICE = 256  # callbacks applied per worker turn
BUSY_INBOX_SLICE = 32  # … while callbacks are arriving, so no callback's commit waits behind a long one
BUSY_PAUSE = 0.02  # seconds between worker turns while callbacks are arriving
DATABASE_RETRY = 1.0  # seconds between claims while the database cannot be reached
# Seconds between looks at whether a running download is still wanted, besides the look each change of
# its task prompts (this process's own changes, and every replica's under PostgreSQL): the bound on how
# long a task ended by another process (an SQLite `--role api`, a lost NOTIFY) keeps its download slot.
WANTED_CHECK = 5.0


def build_pacer(settings: Settings) -> Pacer:
    """Each provider's limits: its own documented defaults, overridden by <NAME>_MAX_* settings."""
    groups = {name: provider.pace_group or name for name, provider in REGISTRY.items()}
    limits: dict[str, Limits] = {}
    for group in set(groups.values()):
        owner = (
            REGISTRY[group]
            if group in REGISTRY
            else REGISTRY[next(p for p, g in groups.items() if g == group)]
        )
        configured = settings.provider(owner.name)
        per_window, window = owner.rate_limit or (None, 60.0)
        if configured.max_per_minute:
            per_window, window = configured.max_per_minute, 60.0
        limits[group] = Limits(
            per_window=per_window,
            window=window,
            max_concurrent=configured.max_concurrent or owner.max_concurrent,
            max_concurrent_by_model=owner.max_concurrent_by_model,
        )
    return Pacer(groups, limits)


async def send_capped(client: httpx.AsyncClient, request: httpx.Request, cap: int) -> httpx.Response:
    """Send and read the answer, refusing to hold more than `cap` bytes of it."""
    response = await client.send(request, stream=True)
    try:
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > cap:
                raise ProviderUnavailable(f"the answer is over {cap} bytes", maybe_ran=True)
    finally:
        await response.aclose()
    return httpx.Response(
        response.status_code, headers=response.headers, content=bytes(body), request=request
    )


CONNECT_TIMEOUT = 10.0
# Failures after which the request surely never reached the provider: retried freely. Anything else
# that breaks after sending (read timeout, dropped connection, unreadable answer) may have run.
NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


def maybe_ran(exc: Exception) -> bool:
    """Whether a failed submit may have reached the provider and run there (so it must not be resent)."""
    if isinstance(exc, ProviderUnavailable):
        return exc.maybe_ran
    return isinstance(exc, httpx.TransportError) and not isinstance(exc, NEVER_SENT)


def _wanted(target: DownloadTarget | None, url: str) -> bool:
    """Whether the task still wants this image from this link: it is downloading and the image is not
    stored yet (a task that ended, whatever ended it, or moved on wants nothing more from the link)."""
    return (
        target is not None
        and target.status == Status.DOWNLOADING
        and target.image.path is None
        and target.image.source_url == url
    )


def _filled(jobs: list[Job], slots: dict[str, int]) -> bool:
    """Whether a claim took as many jobs of some kind as it had slots for (then more may be due; a
    kind that got fewer had no more due, and the next claim waits for a job to be added or end)."""
    taken: dict[str, int] = {}
    for job in jobs:
        taken[job.kind] = taken.get(job.kind, 0) + 1
    return any(n >= slots.get(kind, 0) for kind, n in taken.items())


class Worker:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        tokens: Tokens,
        provider_http: httpx.AsyncClient,
        outside_http: httpx.AsyncClient,
        media: Media,
    ) -> None:
        self.settings = settings
        self.media = media
        self.store = store
        self.tokens = tokens
        self.provider_http = provider_http
        self.outside_http = outside_http
        # Downloads run in a child process (RECEIVER_DOWNLOAD_PROCESS); their results are recorded here.
        self.fetcher = open_fetcher(settings, provider_http, outside_http, media)
        self.handlers: dict[str, tuple[int, Callable[[Job], Awaitable[None]]]] = {
            "submit": (8, self.submit),
            "download": (settings.download_concurrency, self.download),
            "reconcile": (4, self.reconcile),
            "deadline": (4, self.deadline),
        }
        self._running: dict[str, set[asyncio.Task[None]]] = {kind: set() for kind in self.handlers}
        self._per_tenant: dict[str, int] = {}  # kind -> most jobs of one tenant running at once
        self._held: dict[int, Job] = {}  # claimed and running here: their leases are kept alive
        self.pacer = build_pacer(settings)
        # Set by the app: whether callbacks are arriving right now (then everything else waits a little).
        self.callbacks_busy: Callable[[], bool] = lambda: False
        self._in_flight: dict[tuple[str, str], int] = {}
        self._probes: dict[str, asyncio.Task[None]] = {}  # pace group -> its probe after a 429 hold
        self._stopping = False
        # Links under our own public URL (the built-in provider's results) are the operator's origin,
        # trusted as given like the provider base URLs; every other link goes through the address guard.
        self._own_links = f"{settings.public_url}/"

    def add_handler(
        self,
        kind: str,
        slots: int,
        handler: Callable[[Job], Awaitable[None]],
        *,
        per_tenant: int | None = None,
    ) -> None:
        """Run `kind` jobs with `handler`, `slots` at once; with `per_tenant`, no more than that many of
        one tenant's, so one tenant's slow jobs leave the other slots to the other tenants."""
        self.handlers[kind] = (slots, handler)
        self._running[kind] = set()
        if per_tenant is not None:
            self._per_tenant[kind] = per_tenant

    # -- the loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(), name="receiver-lease-heartbeat")
        try:
            await self._run()
        finally:
            heartbeat.cancel()

    async def _heartbeat(self) -> None:
        """Extend the leases of the jobs running here, so only a dead or hung process loses them."""
        every = self.settings.job_lease / 3
        while True:
            await asyncio.sleep(every)
            try:
                await self.store.extend_leases(list(self._held.values()))
            except Exception as exc:  # the database is away: the next beat tries again
                event(log, "lease heartbeat failed", level=logging.WARNING, reason=str(exc)[:200])

    async def _run(self) -> None:
        while not self._stopping:
            self.store.jobs_changed.clear()
            # Pacing decides from the counts of the previous turn; each submit checks again before it
            # goes, so a stale count can only delay a task by one turn, never overrun a limit.
            paced_out = self.pacer.blocked(self._in_flight)
            busy = self.callbacks_busy()
            slots = {kind: slots - len(self._running[kind]) for kind, (slots, _) in self.handlers.items()}
            if busy:
                # Callbacks first: while they pour in, one download at a time and the inbox in slices.
                slots["download"] = min(slots.get("download", 0), 1 - len(self._running["download"]))
            if slots.get("submit", 0) > 0:
                await self._send_probes()
                slots["submit"] = self.handlers["submit"][0] - len(self._running["submit"])
            try:
                claimed = await self.store.claim_due(
                    slots,
                    paced_out,
                    self.pacer.counted_providers(),
                    BUSY_INBOX_SLICE if busy else INBOX_SLICE,
                    self.pacer.rate_windows(),
                    self._per_tenant,
                )
            except Exception as exc:  # the database is away: jobs wait in it, try again shortly
                event(log, "cannot claim jobs", level=logging.WARNING, reason=str(exc)[:200])
                await asyncio.sleep(DATABASE_RETRY)
                continue
            self._in_flight = claimed.in_flight
            wall = time.time()
            for group, pace in claimed.paces.items():
                if group in self.pacer.groups():
                    self.pacer.observe(
                        group,
                        pace.held_until,
                        pace.holds,
                        pace.sends,
                        wall,
                        count=pace.count,
                        newest=pace.newest,
                    )
            for task_id, provider, result in claimed.applied:
                metrics.CALLBACKS_APPLIED.labels(provider, result).inc()
                level = logging.DEBUG if result == "changed" else logging.INFO
                event(log, "callback applied", level=level, task_id=task_id, provider=provider, result=result)
            for job in claimed.jobs:
                self._start(job)
            if claimed.more_news or _filled(claimed.jobs, slots):
                if busy:
                    await asyncio.sleep(BUSY_PAUSE)  # leave the loop (and the writer) to the callbacks
                continue  # claim again at once: more may be due, or slots may have freed meanwhile
            # Nothing claimable: sleep until the next job falls due, a window opens, or (through
            # jobs_changed) a job is added or finishes. Due jobs waiting for a slot wait for the latter.
            now = time.time()
            due = claimed.next_due
            wait = 1.0 if due is None or due <= now else min(1.0, due - now)
            opens = self.pacer.next_change()
            if opens is not None:
                wait = min(wait, opens)
            try:
                await asyncio.wait_for(self.store.jobs_changed.wait(), wait)
            except TimeoutError:
                pass

    def _start(self, job: Job) -> asyncio.Task[None]:
        handler = self.handlers[job.kind][1]
        task = asyncio.create_task(self._run_job(handler, job), name=f"job-{job.kind}-{job.id}")
        self._running[job.kind].add(task)
        self._held[job.id] = job
        task.add_done_callback(self._job_done(job))
        return task

    async def _send_probes(self) -> None:
        """After a 429 hold, each held group's oldest waiting submit goes alone (see receiver.pacing):
        claimed in a turn of its own, since ordinary claims leave the held group's submits alone."""
        for group in self.pacer.probes_due():
            if group in self._probes:
                continue
            members = set(self.pacer.providers_of(group))
            others = sorted(name for name in REGISTRY if name not in members)
            claimed = await self.store.claim_due({"submit": 1}, others, (), 0)
            if not claimed.jobs:
                self.pacer.no_probe_needed(group)
            for job in claimed.jobs:
                probe = self._start(job)
                self._probes[group] = probe
                probe.add_done_callback(self._probe_done(group))

    def _probe_done(self, group: str) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            self._probes.pop(group, None)

        return done

    def _job_done(self, job: Job) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            self._running[job.kind].discard(task)
            self._held.pop(job.id, None)
            self.store.jobs_changed.set()

        return done

    async def _run_job(self, handler: Callable[[Job], Awaitable[None]], job: Job) -> None:
        try:
            await handler(job)
        except asyncio.CancelledError:
            raise
        except StoreUnavailable as exc:  # the database is away: not the job's fault, it runs again
            event(log, "job interrupted", level=logging.WARNING, kind=job.kind, reason=str(exc)[:200])
            await self._retry_or_lease(self.store.retry_job(job, self._backoff(job.attempts), str(exc)), job)
        except Exception as exc:  # a bug, or a row it cannot read: never a loop (see Store.job_failed)
            log.exception("job %s %s for task %s failed", job.kind, job.id, job.task_id)
            reason = f"{type(exc).__name__}: {exc}"
            await self._retry_or_lease(self.store.job_failed(job, self._backoff(job.attempts), reason), job)

    async def _retry_or_lease(self, recording: Awaitable[object], job: Job) -> None:
        try:
            await recording
        except Exception:  # the database is away too: the job's lease runs out and it runs again
            log.warning("job %s %s left to its lease: cannot record the failure", job.kind, job.id)

    def running(self) -> int:
        return sum(len(tasks) for tasks in self._running.values())

    async def stop(self, grace: float) -> int:
        """Stop claiming; give running jobs `grace` seconds, then cancel the rest, which the next start
        runs again (their rows stay). Returns how many were cut short."""
        self._stopping = True
        self.store.jobs_changed.set()
        running = [task for tasks in self._running.values() for task in tasks]
        pending: set[asyncio.Task[None]] = set()
        if running:
            _, pending = await asyncio.wait(running, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.fetcher.close()  # after the downloads: none is left waiting on the child
        return len(pending)

    def _backoff(self, attempts: int, retry_after: float | None = None) -> float:
        delay = self.settings.retry_base * 2.0 ** max(0, attempts - 1)
        delay *= 1 + random.random() * 0.25
        return max(delay, retry_after or 0.0)

    def _context(self, row: TaskRecord) -> Context:
        # The callback URL names the provider and the hop it is for (see receiver.tokens).
        return Context(
            settings=self.settings.provider(row.provider),
            callback_url=self.tokens.callback_url(row.provider, row.id, len(row.attempts)),
        )

    # -- jobs ------------------------------------------------------------------------------------

    async def submit(self, job: Job) -> None:
        row = await self.store.task_row(job.task_id)
        if row is None or row.status != Status.QUEUED or job.arg != len(row.attempts):
            # A callback or the deadline got there first, or the task has moved to a fallback provider
            # since this job was made (each hop has its own submit job, numbered by the hop).
            await self.store.finish_job(job)
            return
        provider = REGISTRY[row.provider]
        counted = self.pacer.counted_providers()
        counts = await self.store.in_flight(counted) if provider.name in counted else {}
        if not self.pacer.try_acquire(provider.name, row.model, counts):
            await self.store.unclaim(job)  # its turn comes when the provider has room again
            return
        # The same again in the database, for every worker process at once (see receiver.pacing).
        group = self.pacer.group_of(provider.name)
        limits = self.pacer.limits_of(group)
        probe = self._submit_timeout(provider) + CONNECT_TIMEOUT if self.pacer.probing(group) else 0.0
        try:
            taken = await self.store.pace_acquire(
                job, group, self.pacer.providers_of(group), limits.per_window, limits.window, probe
            )
        except BaseException:
            self.pacer.cancel(provider.name, row.model)
            raise
        if not taken:
            self.pacer.cancel(provider.name, row.model)
            await self.store.unclaim(job)
            return
        try:
            await self._submit(job, row, provider)
        finally:
            if self.pacer.release(provider.name, row.model):
                await self.store.pace_end_probe(group)

    def _submit_timeout(self, provider: Provider) -> float:
        return self.settings.sync_timeout if provider.synchronous else self.settings.http_timeout

    async def _submit(self, job: Job, row: TaskRecord, provider: Provider) -> None:
        timeout = self._submit_timeout(provider)
        try:
            inline = None
            if provider.inline_images:
                inline = {name: await self.media.read(f"uploads/{name}") for name in uploads_of(row)}
            spec = task_spec(row, self.tokens, inline)
            request = provider.build_submit(spec, self._context(row))
            # A synchronous provider generates inside this call: it gets the long timeout.
            request.extensions["timeout"] = httpx.Timeout(timeout, connect=CONNECT_TIMEOUT).as_dict()
            response = await self._call(provider.name, "submit", request)
            submission = provider.parse_submit(response)
        except ProviderRejected as exc:
            await self._fail_submit(
                job, provider, ErrorCode.PROVIDER_REJECTED, exc.message, exc.provider_code
            )
            return
        except (ProviderUnavailable, httpx.HTTPError, MediaError) as exc:
            message = exc.message if isinstance(exc, ProviderUnavailable) else f"{type(exc).__name__}: {exc}"
            if maybe_ran(exc):
                if isinstance(exc, httpx.TimeoutException):
                    message = f"no answer within {timeout:g} s ({message})"
                await self._outcome_unknown(job, provider, message)
                return
            if job.attempts > self.settings.submit_retries:
                message = f"gave up after {job.attempts} tries: {message}"
                await self._fail_submit(job, provider, ErrorCode.PROVIDER_UNAVAILABLE, message)
                return
            after = exc.retry_after if isinstance(exc, ProviderUnavailable) else None
            delay = self._backoff(job.attempts, after)
            limited = isinstance(exc, ProviderUnavailable) and exc.rate_limited
            if limited:
                # A 429 despite pacing: hold back every task of this provider, not only this one.
                group = self.pacer.group_of(provider.name)
                shared = await self.store.pace_hold(group, delay, self.pacer.probing(group))
                self.pacer.hold(provider.name, delay, shared=shared)
            event(
                log,
                "submit failed, will retry",
                level=logging.WARNING,
                task_id=job.task_id,
                provider=provider.name,
                attempt=job.attempts,
                retry_in=round(delay, 2),
                reason=message[:200],
            )
            await self.store.add_event(job.task_id, "submit", True, f"try {job.attempts} failed: {message}")
            if limited:
                # It keeps its place in the queue and goes first (alone) when the hold ends.
                await self.store.unclaim(job)
            else:
                await self.store.retry_job(job, delay, message)
            return
        await self.store.record_submission(
            job, submission, urgent=provider.early_download, provider=provider.name
        )
        event(
            log,
            "task submitted",
            task_id=job.task_id,
            provider=provider.name,
            provider_task_id=submission.provider_task_id,
            synchronous=submission.outcome is not None,
        )

    async def _outcome_unknown(self, job: Job, provider: Provider, reason: str) -> None:
        """The request reached the provider and no clear answer came back: it may be running (and
        billed), so it is never sent again. A provider that calls back names our task in its callback
        URL, so the task waits for that callback (or reconcile, or the deadline); a synchronous one has
        nothing to wait for or ask, so the task fails and says the provider may have run it."""
        event(
            log,
            "submit outcome unknown, not sent again",
            level=logging.WARNING,
            task_id=job.task_id,
            provider=provider.name,
            reason=reason[:200],
        )
        if provider.synchronous:
            message = (
                f"{reason}; {provider.name} may have run the task (and charged for it) without"
                " answering, so it is not sent again"
            )
            await self._fail_submit(job, provider, ErrorCode.PROVIDER_UNAVAILABLE, message, OUTCOME_UNKNOWN)
            return
        note = (
            f"outcome unknown: {reason}; the provider may have accepted the task, so it is not sent"
            " again: waiting for its callback (RECEIVER_TASK_DEADLINE ends the task otherwise)"
        )
        await self.store.record_submission(
            job, Submission(provider_task_id=None, note=note), provider=provider.name
        )

    async def _fail_submit(
        self, job: Job, provider: Provider, code: ErrorCode, message: str, provider_code: str | None = None
    ) -> None:
        # The task's end is logged where it is recorded (the store's one "task failed" line).
        error = TaskError(code, message, provider_code)
        await self.store.fail_task(job.task_id, error, "submit", job.id, provider=provider.name)

    async def download(self, job: Job) -> None:
        target = await self.store.download_target(job.task_id, job.arg)
        if target is None or not _wanted(target, target.image.source_url):
            await self.store.finish_job(job)  # already stored, or the task ended
            return
        url = target.image.source_url
        started = time.monotonic()
        try:
            stored = await self._fetch_while_wanted(job, url)
        except DownloadError as exc:
            metrics.DOWNLOADS.labels(exc.kind).inc()
            delays = self.settings.download_retry_delays
            fields = {"task_id": job.task_id, "image": job.arg, "host": url_host(url), "reason": exc.kind}
            # Our own media store being down is not the image's fault: such a download keeps trying at
            # the last delay until the bucket is back or the task's deadline ends it.
            ours = exc.kind == "media"
            if exc.permanent or (job.attempts > len(delays) and not ours):
                tries = "" if exc.permanent else f" after {job.attempts} tries"
                error = TaskError(ErrorCode.DOWNLOAD_FAILED, f"image {job.arg}: {exc.reason}{tries}")
                event(log, "download failed, giving up", level=logging.WARNING, **fields)
                await self.store.fail_task(job.task_id, error, "download", job.id)
                return
            event(log, "download failed, will retry", level=logging.WARNING, attempt=job.attempts, **fields)
            await self.store.add_event(
                job.task_id, "download", True, f"image {job.arg} try {job.attempts} failed: {exc.reason}"
            )
            delay = delays[min(job.attempts, len(delays)) - 1] if delays else 1.0
            await self.store.retry_job(job, delay, exc.reason)
            return
        if stored is None:
            metrics.DOWNLOADS.labels("cancelled").inc()
            event(log, "download cancelled: the task no longer wants it", task_id=job.task_id, image=job.arg)
            await self.store.finish_job(job)
            return
        metrics.DOWNLOADS.labels("stored").inc()
        metrics.DOWNLOAD_BYTES.inc(stored.size)
        metrics.DOWNLOAD_SECONDS.observe(time.monotonic() - started)
        event(
            log,
            "image stored",
            task_id=job.task_id,
            image=job.arg,
            bytes=stored.size,
            host=url_host(url),
            seconds=round(time.monotonic() - started, 3),
        )
        await self.store.record_image(
            job,
            path=stored.key,
            content_type=stored.content_type,
            size=stored.size,
            sha256=stored.sha256,
            width=stored.width,
            height=stored.height,
        )

    async def _fetch_while_wanted(self, job: Job, url: str) -> StoredImage | None:
        """The image, or None once the task no longer wants it: then the fetch is cancelled at once (in the
        download child too) and the slot is free. RECEIVER_DOWNLOAD_TIMEOUT bounds the attempt in all, so
        a host that trickles a byte at a time, within every read timeout, cannot hold a slot for longer."""
        limit = self.settings.download_timeout
        fetch = asyncio.ensure_future(
            self.fetcher.fetch(
                url,
                f"{job.task_id}/{job.arg}",
                self.settings.max_image_bytes,
                trusted=url.startswith(self._own_links),
            )
        )
        unwanted = asyncio.ensure_future(self._until_unwanted(job, url))
        try:
            await asyncio.wait((fetch, unwanted), timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for running in (fetch, unwanted):
                running.cancel()
            await asyncio.gather(fetch, unwanted, return_exceptions=True)
        if fetch.done() and not fetch.cancelled():
            return fetch.result()
        if unwanted.done() and not unwanted.cancelled():
            return None
        raise DownloadError(
            f"no whole image within {limit:g} s (RECEIVER_DOWNLOAD_TIMEOUT)", permanent=False, kind="timeout"
        )

    async def _until_unwanted(self, job: Job, url: str) -> None:
        """Return once the task no longer wants the image from `url`: looked at whenever the task changes,
        and every WANTED_CHECK seconds."""
        while True:
            await self.store.wait_for_change(job.task_id, WANTED_CHECK)
            try:
                target = await self.store.download_target(job.task_id, job.arg)
            except Exception as exc:  # the database is away: the download goes on, the next look tries again
                event(log, "cannot check a running download", level=logging.WARNING, reason=str(exc)[:200])
                continue
            if not _wanted(target, url):
                return

    async def reconcile(self, job: Job) -> None:
        row = await self.store.task_row(job.task_id)
        if row is None or row.status != Status.SUBMITTED:
            await self.store.finish_job(job)
            return
        provider = REGISTRY[row.provider]
        interval = min(
            self.settings.reconcile_interval * 2 ** max(0, job.attempts - 1), MAX_RECONCILE_INTERVAL
        )
        request = provider.build_status(task_spec(row), self._context(row))
        if request is None:
            await self.store.retry_job(job, interval, "nothing to ask yet")
            return
        try:
            answer: Outcome | httpx.Request = request
            for _ in range(MAX_STATUS_HOPS):
                if not isinstance(answer, httpx.Request):
                    break
                response = await self._call(provider.name, "status", answer)
                answer = provider.parse_status(response)
            if isinstance(answer, httpx.Request):
                raise ProviderUnavailable(f"the status query did not settle in {MAX_STATUS_HOPS} requests")
            outcome = answer
        except (ProviderUnavailable, ProviderRejected, httpx.HTTPError) as exc:
            message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            event(
                log,
                "status query failed",
                level=logging.WARNING,
                task_id=job.task_id,
                provider=provider.name,
                reason=message[:200],
            )
            await self.store.add_event(job.task_id, "poll", True, f"status query failed: {message}")
            await self.store.retry_job(job, max(interval, getattr(exc, "retry_after", None) or 0.0), message)
            return
        outcome = replace(outcome, provider=provider.name)  # stale if the task moved on meanwhile
        change = await self.store.apply_outcome(job.task_id, outcome, "poll", urgent=provider.early_download)
        event(
            log,
            "status polled",
            task_id=job.task_id,
            provider=provider.name,
            state=outcome.state,
            change=change or None,
        )
        if outcome.state == "pending":
            await self.store.retry_job(job, interval, "still pending")
        else:
            await self.store.finish_job(job)

    async def deadline(self, job: Job) -> None:
        await self.store.fail_task(job.task_id, timed_out(), "deadline", job.id)

    async def _call(self, provider: str, endpoint: str, request: httpx.Request) -> httpx.Response:
        """A request to a provider, counted by provider, endpoint and answer."""
        request.headers["User-Agent"] = USER_AGENT
        started = time.monotonic()
        try:
            response = await send_capped(self.provider_http, request, MAX_PROVIDER_ANSWER)
        except (httpx.HTTPError, ProviderUnavailable):
            metrics.PROVIDER_REQUESTS.labels(provider, endpoint, "error").inc()
            raise
        finally:
            metrics.PROVIDER_SECONDS.labels(provider, endpoint).observe(time.monotonic() - started)
        metrics.PROVIDER_REQUESTS.labels(provider, endpoint, str(response.status_code)).inc()
        return response

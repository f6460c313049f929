"""User fields that more than one users source of a job sets: for a user in several of them the platform keeps
whichever request lands last — the sources' batches are sent side by side, so which one that is changes from run
to run. Told to the user (``validate``, ``plan``, the run's log), not refused: sources that hold different users
(one export per region) are a sound job."""

from __future__ import annotations

from sync.config._job import AttributeMode, Job, SourceKind

__all__ = ["shared_fields"]


def shared_fields(job: Job) -> list[str]:
    """A note for each user field set by more than one users source of ``job``, naming the sources. Fields that
    add to what the platform holds (tags, list attributes in ``push``/``pull`` mode) do not conflict."""
    owners: dict[str, list[str]] = {}
    for source in job.sources:
        if source.kind is not SourceKind.USERS:
            continue
        fields = [f"attribute {m.attribute}" for m in source.attributes if m.mode is AttributeMode.SET]
        opt_ins = source.opt_ins
        kinds = (("push", opt_ins.push), ("e-mail", opt_ins.email), ("SMS", opt_ins.sms))
        fields += [f"the {kind} opt-in" for kind, column in kinds if column]
        fields += [f"category {name}" for name in opt_ins.categories]
        if source.email:
            fields.append("the e-mail address")
        if source.msisdn:
            fields.append("the phone number")
        for name in dict.fromkeys(fields):
            owners.setdefault(name, []).append(source.name)
    return [
        f"{name} is set by sources {', '.join(sources)}: a user in more than one of them gets whichever value "
        "lands last, which may change from run to run; to let the newest row decide, make them one source "
        "with several files (paths, or a glob)"
        for name, sources in owners.items()
        if len(sources) > 1
    ]

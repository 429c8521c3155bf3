"""The first full sync of a newly consented user, as one recorded run (`kind` onboard).

The consent callback starts it; run it by hand with
`anyio.run(lambda: onboard(user_id="usr_0042"))`. A grant that is not active makes the
run Failed with the reason in `onboard-failures`.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from prefect import State, flow
from pydantic import Field

from flows._common import final_state, recorded_run, run_services, sync_batch
from loop_sync.sync import RunSummary


@flow(name="onboard", persist_result=False, flow_run_name="onboard-{user_id}")
async def onboard(
    user_id: Annotated[str, Field(min_length=1)],
) -> State[RunSummary]:
    """Pull everything Loop holds for this user and write it; Failed if it did not work.

    Args:
        user_id: the Loop user id that just consented.
    """
    return await asyncio.to_thread(_onboard, user_id)


def _onboard(user_id: str) -> State[RunSummary]:
    with run_services() as services, recorded_run(services, "onboard") as summary:
        summary.merge(sync_batch(summary.run_id, [user_id], 1))
    return final_state(summary)

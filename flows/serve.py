"""The serve flow: register what passed parity, smoke-test it through Ollama, then promote it.

The finetune flow runs it as its last step; `tunepipe register RUN_ID` runs it for a finished run whose
Ollama could not be reached, from the plan that run logged.
"""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel

from tunepipe.tasks.integrations.model_registry import ChampionMove
from tunepipe.tasks.runtime.retries import network_retries
from tunepipe.tasks.serve.results import Registration, ServingPlan, SmokeReport
from tunepipe.tasks.serve.task import load_plan, promote, register, smoke_test


class Serving(BaseModel):
    registration: Registration
    smoke: SmokeReport | None = None  # None: not registered, so not asked
    promotion: ChampionMove | None = None

    @property
    def served(self) -> bool:
        return self.promotion is not None


@flow(name="serve")
def serve(plan: ServingPlan) -> Serving:
    # Each step talks to Ollama and the model registry and is safe to repeat: retried on transient failures.
    retrying = network_retries(plan.retry)
    registration = register.with_options(**retrying)(plan)
    if registration.state != "registered":
        return Serving(registration=registration)
    smoke = smoke_test.with_options(**retrying)(plan, registration)
    promotion = promote.with_options(**retrying)(plan, registration)
    return Serving(registration=registration, smoke=smoke, promotion=promotion)


@flow(name="register")
def register_run(run_id: str, tracking_uri: str) -> Serving:
    return serve(load_plan(tracking_uri, run_id))

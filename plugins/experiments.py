"""experiments: A/B tests of models, system prompts and parameters on real traffic.

    experiments:                          # top-level section of config.yaml (hot-reloaded)
      - name: drafts-on-mini
        match: {actions: [email_draft], models: [gpt-4o], tiers: [pro]}   # empty = everything
        control: current                  # default: the first variant
        variants:
          - {name: current, weight: 50}
          - {name: mini, weight: 50, model: gpt-4o-mini,
             system_prompt: "You write short, friendly emails.", params: {temperature: 0.3}}
    plugins:
      - auth
      - experiments                       # after auth, before tier_policy and energy
      - tier_policy
      - energy

A request the first enabled, matching experiment applies to gets a variant, sticky per
user: a hash of (experiment, user) is a point in [0, 1) and the variants own consecutive
slices of it sized by their weights, so a user keeps their variant across requests and
processes, and changing 50/50 to 60/40 moves only the users between 0.5 and 0.6. A variant
may set the model (a public model), replace the system prompt (or put one first) and set
OpenAI chat parameters. A variant whose model the user's tier may not use serves the
control instead (logged as `experiment_variant_not_allowed`, recorded as the control);
energy and downgrades then apply as for any request.

Every usage row records `experiment` and `variant`; the answer carries
`X-Experiment: <experiment>=<variant>`. Apps report outcomes with `POST /v1/feedback`
(gateway/feedback.py), and `usage experiments` / `GET /admin/usage/experiments` compare the
variants (requests, cost, energy, tokens, latency, errors, each feedback metric's mean with
a 95% confidence interval and its difference to the control).
"""

from __future__ import annotations

import hashlib
from typing import Any

import structlog

from gateway.config import ExperimentConfig, Variant
from plugins.base import Plugin, RequestContext

log = structlog.get_logger("gateway.experiments")


def bucket(experiment: str, user_id: str) -> float:
    """The user's sticky point in [0, 1) for this experiment."""
    digest = hashlib.sha256(f"{experiment}\x00{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def assign(experiment: ExperimentConfig, user_id: str) -> Variant:
    point = bucket(experiment.name, user_id) * sum(v.weight for v in experiment.variants)
    edge = 0.0
    for variant in experiment.variants:
        edge += variant.weight
        if point < edge:
            return variant
    return experiment.variants[-1]


def _with_system_prompt(messages: list[Any], prompt: str) -> list[Any]:
    if messages and isinstance(messages[0], dict) and messages[0].get("role") in ("system", "developer"):
        return [{**messages[0], "content": prompt}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


class Experiments(Plugin):
    name = "experiments"

    async def _matches(self, ctx: RequestContext, experiment: ExperimentConfig) -> bool:
        match, identity = experiment.match, ctx.identity
        action = ctx.action or ctx.config.energy.default_action
        if match.actions and action not in match.actions:
            return False
        if match.models and ctx.requested_model not in match.models:
            return False
        if match.tiers and identity.tier not in match.tiers:
            return False
        if match.workspaces and identity.workspace_id not in match.workspaces:
            workspace = None
            if self.services.directory is not None:
                workspace = await self.services.directory.workspace(identity.workspace_id)
            if workspace is None or workspace.name not in match.workspaces:
                return False
        return True

    async def on_request(self, ctx: RequestContext) -> None:
        if not ctx.conversation or ctx.identity is None or not ctx.candidates:
            return
        for experiment in ctx.config.experiments:
            if experiment.enabled and await self._matches(ctx, experiment):
                break
        else:
            return
        variant = assign(experiment, ctx.identity.user_id)
        tier = ctx.config.tiers.get(ctx.identity.tier)
        if variant.model is not None and (tier is None or not tier.allows(variant.model)):
            log.info("experiment_variant_not_allowed", experiment=experiment.name, variant=variant.name,
                     model=variant.model, tier=ctx.identity.tier, served=experiment.control_variant.name)
            variant = experiment.control_variant
        if variant.model is not None and variant.model != ctx.requested_model:
            ctx.requested_model = ctx.model = variant.model
            ctx.candidates = [variant.model]
        if variant.system_prompt is not None and isinstance(ctx.body.get("messages"), list):
            ctx.body["messages"] = _with_system_prompt(ctx.body["messages"], variant.system_prompt)
        if variant.params:
            ctx.body.update(variant.params)
        ctx.experiment, ctx.variant = experiment.name, variant.name
        ctx.response_headers["X-Experiment"] = f"{experiment.name}={variant.name}"

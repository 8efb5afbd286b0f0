"""``create_custom_loss``: per-datum losses a session uploads once and then names in
``forward_backward(loss_fn="custom", loss_fn_config={"loss_id": …})``.

A loss belongs to the session that created it (and so to that session's user); for any
other session it does not exist. Creating is idempotent on ``(session_id,
custom_loss_seq_id)``, since the SDK resends the same body when it retries. The graph is
checked completely at create time (:mod:`treadle.engine.custom_graph`); nothing of it
runs until a forward_backward does. Losses live in memory and end with their session.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from treadle.engine.custom_graph import Graph, same_request, validate
from treadle.errors import NotFound, UserInputError
from treadle.service.sessions import Sessions
from treadle.settings import Settings


@dataclass(frozen=True)
class CustomLoss:
    loss_id: str
    session_id: str
    user: str
    body: Mapping[str, Any]  # what created it: a retry must send the same
    graph: Graph


class CustomLosses:
    def __init__(self, sessions: Sessions, settings: Settings) -> None:
        self._sessions = sessions
        self._settings = settings
        self._losses: dict[str, CustomLoss] = {}
        self._lock = threading.Lock()

    def create(
        self, user: str, session_id: str, seq_id: int, body: Mapping[str, Any]
    ) -> dict[str, str]:
        """Check and store a loss; its answer, ``{"loss_id", "type"}``. Raises
        :class:`UserInputError`/:class:`NotFound` for what the user must change."""
        self._sessions.check_live(session_id, user)
        if not self._settings.custom_loss_server_side:
            raise UserInputError(
                "this server runs custom losses client-side (it was started without"
                " --custom-loss-server-side); forward_backward_custom needs no upload here"
            )
        if type(seq_id) is not int or seq_id < 0:
            raise UserInputError("custom_loss_seq_id must be a non-negative integer")
        loss_id = f"{session_id}:loss:{seq_id}"
        answer = {"loss_id": loss_id, "type": "create_custom_loss"}
        with self._lock:
            existing = self._losses.get(loss_id)
            if existing is not None:
                if not same_request(existing.body, body):
                    raise UserInputError(
                        f"custom loss {loss_id} exists with another graph; create the new loss"
                        " under another custom_loss_seq_id"
                    )
                return answer
            mine = sum(1 for loss in self._losses.values() if loss.session_id == session_id)
        limit = self._settings.max_custom_losses_per_session
        if mine >= limit:
            raise UserInputError(
                f"custom losses per session: the limit is {limit}"
                " (--max-custom-losses-per-session); reuse the LossHandles you have"
            )
        graph = validate(
            body.get("name"),
            body.get("inputs"),
            body.get("graph"),
            self._settings.max_custom_loss_nodes,
        )
        with self._lock:
            self._losses.setdefault(loss_id, CustomLoss(loss_id, session_id, user, body, graph))
        return answer

    def get(self, user: str, session_id: str, config: Mapping[str, float | str]) -> Graph:
        """The loss a ``custom`` forward_backward of a model in ``session_id`` names."""
        loss_id = config.get("loss_id")
        if not isinstance(loss_id, str) or set(config) != {"loss_id"}:
            raise UserInputError(
                'loss_fn "custom" takes loss_fn_config {"loss_id": <id from create_custom_loss>}'
                f" and nothing else; got keys {sorted(config)}"
            )
        loss = self._losses.get(loss_id)
        if loss is None or loss.user != user or loss.session_id != session_id:
            raise NotFound(
                f"custom loss {loss_id!r} not found in this model's session; create it with"
                " ServiceClient.create_custom_loss in the session that trains"
            )
        return loss.graph

    def end_session(self, session_id: str) -> None:
        with self._lock:
            for loss_id in [k for k, v in self._losses.items() if v.session_id == session_id]:
                del self._losses[loss_id]

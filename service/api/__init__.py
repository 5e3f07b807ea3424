"""The HTTP protocols, one module-level ``APIRouter`` each; :func:`service.app.create_app` wires them.

A protocol module is its request/response schema plus the translation between them and the
:class:`~service.scoring.ScoringService` (reached through ``request.app.state.runtime``). Refusals are raised as
:mod:`service.errors` types and rendered by the handlers in :mod:`service.api.common`.
"""

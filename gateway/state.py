"""Typed application state shared by the views (aiohttp `AppKey`s)."""

from __future__ import annotations

from aiohttp import web

from gateway.batches import BatchService
from gateway.db import Database
from gateway.events import BatchEvents
from gateway.filestore import FileStore
from gateway.metrics import GatewayMetrics
from runtime.config import Config

CONFIG = web.AppKey("config", Config)
DB = web.AppKey("db", Database)
STORE = web.AppKey("store", FileStore)
SERVICE = web.AppKey("service", BatchService)
METRICS = web.AppKey("metrics", GatewayMetrics)
EVENTS = web.AppKey("events", BatchEvents)

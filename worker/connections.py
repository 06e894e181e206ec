"""Kafka and Redis clients built from :class:`WorkerSettings`, with SASL/TLS passed through."""

from __future__ import annotations

from typing import Any

import redis

from worker.settings import WorkerSettings


def kafka_common_config(settings: WorkerSettings) -> dict[str, Any]:
    """kafka-python keyword arguments shared by consumers, producers and admin clients."""
    config: dict[str, Any] = {
        "bootstrap_servers": [
            s.strip() for s in settings.bootstrap_servers.split(",") if s.strip()
        ],
        "security_protocol": settings.security_protocol,
        "client_id": f"carstream-{settings.worker_id}",
    }
    if settings.sasl_mechanism:
        config["sasl_mechanism"] = settings.sasl_mechanism
        if settings.sasl_username is not None:
            config["sasl_plain_username"] = settings.sasl_username
        if settings.sasl_password is not None:
            config["sasl_plain_password"] = settings.sasl_password.get_secret_value()
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        config["ssl_check_hostname"] = settings.ssl_check_hostname
        if settings.ssl_cafile:
            config["ssl_cafile"] = settings.ssl_cafile
        if settings.ssl_certfile:
            config["ssl_certfile"] = settings.ssl_certfile
        if settings.ssl_keyfile:
            config["ssl_keyfile"] = settings.ssl_keyfile
    return config


def redis_client(settings: WorkerSettings) -> redis.Redis:
    """A Redis client; ``rediss://`` URLs use TLS with the configured certificates."""
    kwargs: dict[str, Any] = {
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": settings.redis_socket_timeout_s,
        "health_check_interval": 30,
    }
    if settings.redis_password is not None:
        kwargs["password"] = settings.redis_password.get_secret_value()
    if settings.redis_url.startswith("rediss://"):
        if settings.redis_tls_ca_certs:
            kwargs["ssl_ca_certs"] = settings.redis_tls_ca_certs
        if settings.redis_tls_certfile:
            kwargs["ssl_certfile"] = settings.redis_tls_certfile
        if settings.redis_tls_keyfile:
            kwargs["ssl_keyfile"] = settings.redis_tls_keyfile
    return redis.Redis.from_url(settings.redis_url, **kwargs)

"""WorkerSettings refuses Kafka and Redis addresses its clients would crash on, in every CLI,
and names a TLS file setting whose file the clients could not open."""

from __future__ import annotations

import os
import subprocess

import pytest
from kafka.cluster import collect_hosts
from pydantic import ValidationError

from tests.support import make_certificates, worker_cli
from training.cli_errors import first_validation_error
from worker.connections import kafka_common_config, redis_client
from worker.settings import FILE_SETTINGS, WorkerSettings


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("", "no broker given"),
        (" , ", "no broker given"),
        ("127.0.0.1:abc", "'abc'"),
        ("my host", "expected host:port"),
        ("kafka:", "port ''"),
        (":9092", "expected host:port"),
        ("kafka:0", "port '0'"),
        ("kafka:65536", "port '65536'"),
        ("ok:9092,kafka:99999", "'kafka:99999'"),
        ("::1:9092", "[address]:port"),
        ("a..b:9092", "'a..b' is not a valid host name"),
        ("ok:9092," + "x" * 64 + ".example:9092", "is not a valid host name"),
        ("my host:9092", "expected host:port"),
    ],
)
def test_bad_bootstrap_servers_are_refused(value: str, needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        WorkerSettings(bootstrap_servers=value)
    (error,) = info.value.errors()
    assert error["loc"] == ("bootstrap_servers",)
    assert needle in error["msg"]


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("worker_id", "", "empty"),
        ("worker_id", "  ", "empty"),
        ("worker_id", "w" * 201, "at most 200"),
        ("worker_id", "pod-1\nINFO forged", "control"),
        ("worker_id", "pod\u20281", "separator"),
        ("trend_hour_ttl_s", 99_999_999_999_999, "less than or equal"),
        ("trend_minute_ttl_s", 10**12, "less than or equal"),
        # entries no URL host could ever equal: every post of that host would be url_refused
        ("url_allow_hosts", "*.example.com", "wildcards"),
        ("url_allow_hosts", "ok.org,http://example.com/", "not a URL"),
        ("url_allow_hosts", "example.com/images", "not a URL"),
        ("url_allow_hosts", "example.com:443", "without a port"),
        ("url_allow_hosts", "a..b", "not a valid host name"),
    ],
)
def test_settings_no_post_could_satisfy_are_refused(field: str, value: object, needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        WorkerSettings(**{field: value})
    (error,) = info.value.errors()
    assert error["loc"] == (field,) and needle in error["msg"], error


def test_allow_list_entries_are_compared_as_the_fetcher_sees_hosts() -> None:
    from worker.url_fetch import UrlPolicy, _vet_url

    hosts = "Bücher.de., [2001:DB8:0:0::1], CDN.example.com ,"
    settings = WorkerSettings(url_allow_hosts=hosts)
    assert settings.url_allow_hosts == ["xn--bcher-kva.de", "2001:db8::1", "cdn.example.com"]
    policy = UrlPolicy.from_settings(settings)
    for url in (
        "https://bücher.de/a.jpg",
        "http://[2001:db8:0::1]/a.jpg",
        "https://cdn.example.com./x",
    ):
        _vet_url(url, policy)  # url_refused if the allow-list did not match


@pytest.mark.parametrize(
    ("value", "brokers"),
    [
        ("127.0.0.1:9092", ["127.0.0.1:9092"]),
        (" b1:9093 , b2:9093, ", ["b1:9093", "b2:9093"]),
        ("[::1]:9092,kafka-0.kafka.svc:65535", ["[::1]:9092", "kafka-0.kafka.svc:65535"]),
        ("SASL_SSL://broker:9094", ["SASL_SSL://broker:9094"]),  # kafka-python drops the scheme
        # no port: kafka-python's default 9092, which it has always accepted
        ("kafka", ["kafka"]),
        ("kafka,b2:9093,[::1],10.0.0.7", ["kafka", "b2:9093", "[::1]", "10.0.0.7"]),
        ("SASL_SSL://broker", ["SASL_SSL://broker"]),
    ],
)
def test_good_bootstrap_servers_reach_the_clients(value: str, brokers: list[str]) -> None:
    settings = WorkerSettings(bootstrap_servers=value)
    assert kafka_common_config(settings)["bootstrap_servers"] == brokers
    # and kafka-python itself reads every entry (a port-less one as port 9092)
    hosts = collect_hosts(brokers, randomize=False)
    assert len(hosts) == len(brokers) and all(1 <= port <= 65535 for _h, port, _af in hosts)


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("redis://127.0.0.1:99999/0", "port '99999'"),
        ("redis://127.0.0.1:0/0", "port '0'"),
        ("rediss://:secret@cache:abc/0", "port is not a number"),
        # an unencoded "/" in the password splits the URL: what looks like the port is a piece
        # of the password, and must not be echoed
        ("redis://:se/cret@cache:6379/0", "percent-encode"),
        ("redis://:ab#secret@cache:6379/0", "percent-encode"),
        ("redis://cache:6379/zero", "database 'zero'"),
        ("redis://cache:6379/0?socket_timeout=soon", "socket_timeout"),
        ("localhost:6379", "must start with"),
        # host names the socket module cannot encode as IDNA: a UnicodeError traceback at the
        # first command before, past every Redis error handler
        ("redis://a..b/0", "host 'a..b' is not a valid host name"),
        ("rediss://:secret@.cache:6379/0", "host '.cache' is not a valid host name"),
        (f"redis://{'a' * 64}.example/0", "is not a valid host name"),
        ("redis://a\udcffb/0", "host 'a\\udcffb' is not a valid host name"),  # argv's \xff
        ("redis://a%2E%2Eb:6379/0", "host 'a..b'"),  # redis-py unquotes the host
    ],
)
def test_bad_redis_urls_are_refused(url: str, needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        WorkerSettings(redis_url=url)
    (error,) = info.value.errors()
    assert error["loc"] == ("redis_url",)
    assert needle in error["msg"]
    assert "secret" not in str(info.value.errors()[0]["msg"])
    assert "cret" not in error["msg"] and "se'" not in error["msg"]


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6380/0",
        "redis://cache",
        "rediss://user:p:w@cache.example:6379/3",
        "redis://[::1]:6379/0",
        "redis://[::1]/0",
        "redis://[fe80::1%25eth0]:6379/0",  # a zone: an IP literal, not a name to look up
        "redis://bücher.example./0",  # IDNA, and a trailing dot
        "unix:///run/redis.sock?db=2",
    ],
)
def test_good_redis_urls_build_a_client(url: str) -> None:
    client = redis_client(WorkerSettings(redis_url=url))
    client.close()


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (("trends", "--redis-url", "redis://127.0.0.1:99999/0"), {}, "redis_url"),
        (("trends",), {"CARSTREAM_REDIS_URL": "redis://127.0.0.1:99999/0"}, "redis_url"),
        (("produce", "--jsonl", "pyproject.toml", "--bootstrap-servers", ""), {}, "no broker"),
        (("produce", "--jsonl", "pyproject.toml", "--bootstrap-servers", "h:abc"), {}, "'abc'"),
        (("produce", "--jsonl", "pyproject.toml"), {"CARSTREAM_BOOTSTRAP_SERVERS": "h:0"}, "'0'"),
    ],
)
def test_trends_and_produce_refuse_the_same_addresses_in_one_line(args, env, needle) -> None:
    proc = worker_cli(*args, timeout=60, **env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0]


@pytest.mark.parametrize("command", [("trends",), ("run", "--bundle", "/x")])
@pytest.mark.parametrize("host", ["a..b", "a" * 64, "a\udcffb"])  # a\udcffb: argv's a\xffb
@pytest.mark.parametrize("where", ["flag", "env"])
def test_a_redis_host_no_resolver_can_look_up_is_one_line_exit_2(command, host, where) -> None:
    # was a UnicodeError traceback (exit 1) from the first Redis command of `trends`; `run`
    # passed its checks, to meet the same UnicodeError (not a RedisError) at its first batch
    url = f"redis://{host}/0"
    if where == "flag":
        proc = worker_cli(*command, "--redis-url", url, timeout=60, CARSTREAM_METRICS_PORT="0")
    else:
        proc = worker_cli(*command, timeout=60, CARSTREAM_METRICS_PORT="0", CARSTREAM_REDIS_URL=url)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "redis_url" in lines[0] and "is not a valid host name" in lines[0]


# --- files the Kafka and Redis clients open ---------------------------------------------------


@pytest.mark.parametrize("name", FILE_SETTINGS)
def test_a_missing_directory_or_special_file_setting_is_named_with_its_path(name, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, reason in (
        (tmp_path / "absent.pem", "no such file"),
        (tmp_path / "absent-dir" / "ca.pem", "no such file"),
        (tmp_path, "is a directory"),
        (fifo, "not a regular file"),
    ):
        settings = WorkerSettings(**{name: str(path)})  # a description: built without the file
        with pytest.raises(ValueError) as info:
            settings.check_files()
        assert str(info.value).startswith(f"{name}: {str(path)!r}: {reason}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode bits")
def test_an_unreadable_file_setting_is_refused(tmp_path):
    secret = tmp_path / "client.key"
    secret.write_text("key")
    secret.chmod(0)
    with pytest.raises(ValueError, match=r"ssl_keyfile: .*client\.key: not readable"):
        WorkerSettings(ssl_keyfile=str(secret)).check_files()


def test_readable_and_unset_file_settings_pass(tmp_path):
    ca, crt, key = make_certificates(tmp_path)
    links = {}
    for name, target in (("ca", ca), ("crt", crt), ("key", key)):
        links[name] = tmp_path / f"{name}-link.pem"  # Kubernetes projects Secrets as symlinks
        links[name].symlink_to(target)
    WorkerSettings().check_files()
    WorkerSettings(**{name: "" for name in FILE_SETTINGS}).check_files()  # empty is unset
    WorkerSettings(
        ssl_cafile=str(links["ca"]),
        ssl_certfile=str(links["crt"]),
        ssl_keyfile=str(links["key"]),
        redis_tls_ca_certs=str(links["ca"]),
        redis_tls_certfile=str(links["crt"]),
        redis_tls_keyfile=str(links["key"]),
    ).check_files()
    combined = tmp_path / "client.pem"  # certificate and key in one file, no key file set
    combined.write_text(crt.read_text() + key.read_text())
    WorkerSettings(ssl_certfile=str(combined)).check_files()


@pytest.mark.parametrize("prefix", ["ssl", "redis_tls"])
def test_tls_files_that_are_not_what_their_setting_needs_are_named_with_the_reason(
    prefix, tmp_path
):
    # before: kafka-python's "Unable to bootstrap" retried for ever, or a Redis SSL error on
    # every batch, for a CA bundle that holds no certificate or a key that is not the cert's
    _, crt, key = make_certificates(tmp_path)
    (tmp_path / "other").mkdir()
    other = make_certificates(tmp_path / "other")[2]  # a key from another certificate
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN NOTHING-----\n")
    ca_name = "ssl_cafile" if prefix == "ssl" else "redis_tls_ca_certs"
    cert_name, key_name = f"{prefix}_certfile", f"{prefix}_keyfile"
    cases = [
        ({ca_name: garbage}, f"{ca_name}: {str(garbage)!r}: not a CA certificate file: a damaged"),
        ({ca_name: crt.parent / "ext.cnf"}, "not a CA certificate file: no PEM certificate"),
        ({ca_name: key},
         f"{ca_name}: {str(key)!r}: not a CA certificate file: no PEM certificate"),
        ({cert_name: garbage, key_name: key},
         f"{cert_name}: {str(garbage)!r} with {key_name}: {str(key)!r}: no PEM certificate in it"),
        ({cert_name: crt, key_name: other}, "the key does not match the certificate"),
        ({cert_name: crt, key_name: garbage}, "the key file holds no PEM private key"),
        ({cert_name: crt}, f"{cert_name}: {str(crt)!r}: no PEM private key in it, and no key file"),
    ]  # fmt: skip
    for values, expected in cases:
        settings = WorkerSettings(**{k: str(v) for k, v in values.items()})
        with pytest.raises(ValueError) as info:
            settings.check_files()
        assert expected in str(info.value) and "\n" not in str(info.value), values


def test_an_encrypted_key_is_refused_rather_than_prompting_for_its_password(tmp_path):
    _, crt, key = make_certificates(tmp_path)
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        ["openssl", "rsa", "-in", str(key), "-aes256", "-passout", "pass:pw", "-out",
         str(encrypted)],
        check=True, capture_output=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    settings = WorkerSettings(ssl_certfile=str(crt), ssl_keyfile=str(encrypted))
    with pytest.raises(ValueError, match="the key is encrypted"):
        settings.check_files()


def test_run_refuses_a_ca_file_without_certificates_in_one_line(tmp_path):
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    proc = worker_cli(
        "run", "--bundle", "/no/such/bundle", "--security-protocol", "SSL",
        "--ssl-cafile", str(bogus), timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"python -m worker run: error: ssl_cafile: {str(bogus)!r}: not a CA certificate file: "
        "no PEM certificate in it"
    ]


def test_run_refuses_a_missing_ca_file_in_one_line_before_connecting(tmp_path):
    # before: "no Kafka broker at 127.0.0.1:9092; retry N" for ever, after the model loaded
    proc = worker_cli(
        "run", "--bundle", "/no/such/bundle", "--security-protocol", "SSL",
        "--ssl-cafile", str(tmp_path / "ca.pem"), timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"python -m worker run: error: ssl_cafile: {str(tmp_path / 'ca.pem')!r}: no such file"
    ]


@pytest.mark.parametrize("command", [("trends",), ("produce", "--jsonl", "pyproject.toml")])
def test_trends_and_produce_check_the_tls_files_before_connecting(command, tmp_path) -> None:
    missing = tmp_path / "no-ca.crt"
    proc = worker_cli(
        *command, timeout=60, CARSTREAM_SSL_CAFILE=str(missing), CARSTREAM_REDIS_TLS_CA_CERTS=""
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "ssl_cafile" in lines[0] and str(missing) in lines[0]


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("redis://u:s3cret@cache:6379/0?protocol=9", "protocol must be either 2 or 3"),
        ("redis://cache/0?protocol=x", "protocol must be an integer"),
        ("redis://cache/0?nope=1", "unknown option 'nope' in the query"),
        ("rediss://cache/0?ssl_cert_reqs=bogus", "Invalid SSL Certificate Requirements Flag"),
    ],
)
def test_redis_options_redis_py_refuses_only_at_the_first_command_are_refused_up_front(
    url: str, needle: str
) -> None:
    settings = WorkerSettings(redis_url=url)  # the settings' own checks let these through
    with pytest.raises(ValueError, match=r"^redis_url redis") as err:
        redis_client(settings)
    assert needle in str(err.value) and "s3cret" not in str(err.value)


FLOAT_SETTINGS = [
    name
    for name, field in WorkerSettings.model_fields.items()
    if field.annotation in (float, float | None)
]


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "infinity", float("nan")])
@pytest.mark.parametrize("field", FLOAT_SETTINGS)
def test_every_float_setting_must_be_a_finite_number(field: str, value: object) -> None:
    # NaN passes or fails each bound by accident (every comparison is false), and was refused
    # with the last bound's text ("less than or equal to 3600"); inf with a bound's text too
    with pytest.raises(ValidationError) as info:
        WorkerSettings(**{field: value})
    (error,) = info.value.errors()
    assert error["loc"] == (field,) and "finite number" in error["msg"], error


def test_float_settings_are_the_ones_expected() -> None:
    # the finite check is the model's, so it covers a float setting added later as well
    assert {"decode_timeout_s", "min_confidence", "url_timeout_s"} <= set(FLOAT_SETTINGS)


def test_run_refuses_a_nan_setting_in_one_line() -> None:
    done = worker_cli("run", "--decode-timeout-s", "nan", CARSTREAM_MIN_CONFIDENCE="0.5")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "python -m worker run: error: decode_timeout_s: Input should be a finite number"
    )
    done = worker_cli("run", CARSTREAM_MIN_CONFIDENCE="nan")
    assert done.returncode == 2 and "min_confidence: Input should be a finite number" in done.stderr


@pytest.mark.parametrize(
    "url",
    [
        "rediss://redis:6379/0?password=hunter2",
        "redis://redis:6379/0?db=1&PASSWORD=hunter2&ssl_cert_reqs=none",
        "redis://redis:6379/0?pass%77ord=hunter2",  # redis-py percent-decodes the name
        "redis://worker:hunter2@redis:6379/0",
    ],
)
def test_a_redis_password_is_masked_wherever_the_url_carries_it(url):
    """The settings are logged at start: redis-py also reads ``?password=`` from the query."""
    settings = WorkerSettings(redis_url=url)
    shown = settings.redacted()["redis_url"]
    assert "hunter2" not in shown and "hunter2" not in repr(settings)
    assert "**********" in shown and shown.startswith(
        url.split("?")[0].replace("hunter2", "*" * 10)
    )


@pytest.mark.parametrize(
    "fields",
    [
        # a model check after the fields: pydantic quotes every input in the error
        {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "PLAIN",
            "sasl_username": "",
            "sasl_password": "hunter2",
        },
        {"redis_password": "hunter2", "max_batch": -1},
        {"redis_url": "redis://worker:hunter2@redis:6379/0", "max_batch": -1},
        {"redis_url": "redis://worker:hunter2@redis:99999/0"},
    ],
)
def test_a_refused_setting_never_quotes_a_secret_in_its_error(fields):
    """A ValidationError is printed or logged whole by whoever catches it, not always through
    the CLI's one-line summary."""
    with pytest.raises(ValidationError) as info:
        WorkerSettings(**fields)
    assert "hunter2" not in str(info.value)
    assert "hunter2" not in first_validation_error(info.value)


# --- credentials: where a password may hide, and settings that contradict each other ----------

# a password holding an unencoded # ? or / after a numeric prefix: urlsplit read host "default",
# port 2024 and the rest as fragment, query or path, so nothing matched ":{password}@"
AMBIGUOUS_URLS = [
    "redis://default:2024#S3cr3t@10.0.0.5:6379/0",
    "redis://default:2024?S3cr3t@10.0.0.5:6379/0",
    "redis://:7#S3cr3t@10.0.0.5:6379/0",
    "redis://default:2024/S3cr3t@10.0.0.5:6379/0",
    "rediss://u:2024/S3cr3t@cache/0",
    "unix:///run/r.sock?password=20#S3cr3t@x",
]


@pytest.mark.parametrize("url", AMBIGUOUS_URLS)
def test_a_password_that_splits_the_url_is_refused_without_quoting_it(url: str) -> None:
    with pytest.raises(ValidationError) as info:
        WorkerSettings(redis_url=url)
    (error,) = info.value.errors()
    assert error["loc"] == ("redis_url",) and "percent-encode / ? # @" in error["msg"]
    assert "S3cr3t" not in str(info.value) and "2024" not in error["msg"]


@pytest.mark.parametrize(
    "url",
    [
        *AMBIGUOUS_URLS,
        "redis://h/0?password=20@S3cr3t",
        # an unencoded # or & in a query password: its tail read as the fragment or a field
        "redis://127.0.0.1:6380/0?password=2024#S3cr3t",
        "redis://127.0.0.1:6380/0?db=1&password=2024&S3cr3t",
    ],
)
def test_no_form_of_a_url_shows_its_password_when_masked_or_redacted(url: str) -> None:
    from worker.connections import redacted
    from worker.settings import _mask_url_password

    for shown in (_mask_url_password(url), redacted(url)):
        assert "S3cr3t" not in shown and "2024" not in shown, shown
    if "10.0.0.5" in url:  # the host the user meant is still named
        assert redacted(url) == "redis://10.0.0.5:6379/0"


def test_masking_keeps_user_host_and_query_of_a_well_formed_url() -> None:
    from worker.settings import _mask_url_password

    # what follows a query password may be its own tail (an unencoded & or #): masked too
    assert _mask_url_password("redis://u:p@w@h:1/0?password=x&a=1#f") == (
        "redis://u:**********@h:1/0?password=**********"
    )
    assert _mask_url_password("redis://h:1/0?a=1&password=x") == (
        "redis://h:1/0?a=1&password=**********"
    )
    assert _mask_url_password("redis://h:1/0?a=1#f") == "redis://h:1/0?a=1#f"
    assert _mask_url_password("unix://u:pw@/run/r.sock") == "unix://u:**********@/run/r.sock"
    assert _mask_url_password("redis://u@h/0") == "redis://u@h/0"


def test_oauthbearer_is_refused_in_one_line() -> None:
    # no setting supplies kafka-python's token provider: every handshake failed, read as an
    # absent broker and retried for ever
    with pytest.raises(ValidationError) as info:
        WorkerSettings(security_protocol="SASL_SSL", sasl_mechanism="OAUTHBEARER")
    (error,) = info.value.errors()
    assert error["loc"] == ("sasl_mechanism",) and "OAUTHBEARER is not supported" in error["msg"]


@pytest.mark.parametrize(
    "url", ["redis://:hunter2@cache:6379/0", "redis://cache:6379/0?password=hunter2"]
)
def test_a_url_password_and_redis_password_together_are_refused(url: str) -> None:
    # redis-py lets the URL's win: rotating the Secret behind CARSTREAM_REDIS_PASSWORD did nothing
    with pytest.raises(ValidationError) as info:
        WorkerSettings(redis_url=url, redis_password="rotated")
    assert "set one of them" in first_validation_error(info.value)
    assert "hunter2" not in str(info.value) and "rotated" not in str(info.value)
    # a user name in the URL with the password beside it is what redis-py combines
    WorkerSettings(redis_url="redis://worker@cache:6379/0", redis_password="rotated")


def test_tls_and_sasl_settings_the_protocol_does_not_use_are_named() -> None:
    settings = WorkerSettings(
        ssl_cafile="/ca.pem",
        ssl_check_hostname=False,
        sasl_mechanism="PLAIN",
        sasl_username="u",
        sasl_password="p",
        redis_tls_ca_certs="/rca.pem",
    )
    assert settings.ignored_settings() == [
        "ssl_cafile is ignored: security_protocol PLAINTEXT uses no TLS",
        "ssl_check_hostname false is ignored: security_protocol PLAINTEXT uses no TLS",
        "sasl_mechanism is ignored: security_protocol PLAINTEXT uses no SASL",
        "sasl_username is ignored: security_protocol PLAINTEXT uses no SASL",
        "sasl_password is ignored: security_protocol PLAINTEXT uses no SASL",
        "redis_tls_ca_certs is ignored: redis_url is redis://, not rediss:// (TLS)",
    ]
    used = WorkerSettings(
        security_protocol="SASL_SSL",
        ssl_cafile="/ca.pem",
        sasl_mechanism="PLAIN",
        sasl_username="u",
        sasl_password="p",
        redis_url="rediss://cache/0",
        redis_tls_ca_certs="/rca.pem",
    )
    assert used.ignored_settings() == []
    sasl_plaintext = WorkerSettings(
        security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="u",
        sasl_password="p", ssl_certfile="/c.pem",
    )  # fmt: skip
    assert sasl_plaintext.ignored_settings() == [
        "ssl_certfile is ignored: security_protocol SASL_PLAINTEXT uses no TLS"
    ]


def test_a_newline_in_a_file_setting_keeps_the_error_one_line(tmp_path) -> None:
    proc = worker_cli(
        "run", "--bundle", "/no/such/bundle", "--metrics-port", "0", timeout=60,
        CARSTREAM_SSL_CAFILE=f"{tmp_path}/x\ny",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"python -m worker run: error: ssl_cafile: '{tmp_path}/x\\ny': no such file"
    ]

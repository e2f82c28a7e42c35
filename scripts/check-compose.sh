#!/usr/bin/env bash
# Offline checks of the container setup: docker-compose.yml, config/jaeger.yaml
# and config/docker.toml. No Docker engine and no image pulls are needed, so
# this runs in CI (from .ci/run, as root, on a fresh clone) and on a laptop.
#
#   bash scripts/check-compose.sh
#
# What it checks, and why each check is here:
#   1. docker-compose.yml against the Compose Specification JSON schema
#      (check-jsonschema's vendored copy): catches misspelled keys and wrong
#      types, which `docker compose` would otherwise only report at `up`.
#   2. `docker-compose config -q` with Debian's docker-compose (v1.29): a real
#      compose implementation parses the file, interpolates ${VARS} and
#      resolves paths. v1.29 predates the top-level `name:` key and rejects
#      it, so it is fed a temporary copy without that line.
#   3. config/jaeger.yaml parses as YAML and is wired consistently (every
#      component named under `service:` is declared, the OTLP receivers
#      listen beyond loopback, memory storage has a positive trace cap).
#      Jaeger itself cannot run here, so this is the most that can be checked
#      offline.
#   4. config/docker.toml parses as TOML, and the cross-file facts the stack
#      relies on agree (OTLP host/port vs compose service and jaeger.yaml,
#      published ports vs listeners, config mount paths).
#
# Installs what is missing, from PyPI and Debian's archive only: a private
# virtualenv (so Debian's externally-managed system Python is left alone) for
# check-jsonschema and PyYAML, and the docker-compose Debian package.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

# Pinned for reproducible results: the compose-spec schema is vendored inside
# check-jsonschema, so a new release can change what passes.
CHECK_JSONSCHEMA_VERSION="0.39.0"
venv_dir="${STALL_LAB_CI_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/stall-lab/ci-venv}"

export DEBIAN_FRONTEND=noninteractive
apt_updated=0
apt_install() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: need root to apt-get install $*; install them and re-run" >&2
        exit 1
    fi
    if [ "$apt_updated" -eq 0 ]; then
        apt-get update -qq
        apt_updated=1
    fi
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

step() { printf '\n== %s\n' "$*"; }

# --- tools -----------------------------------------------------------------
step "tools"
if ! command -v python3 >/dev/null 2>&1; then
    echo "installing python3 (Debian)"
    apt_install python3 python3-venv
fi

# check-jsonschema and PyYAML come from the venv unless both are already
# available on this machine.
if ! command -v check-jsonschema >/dev/null 2>&1 || ! python3 -c 'import yaml' >/dev/null 2>&1; then
    if [ ! -x "$venv_dir/bin/python3" ]; then
        if ! python3 -m venv "$venv_dir" >/dev/null 2>&1; then
            # Debian splits ensurepip out of python3 into python3-venv.
            echo "installing python3-venv (Debian)"
            rm -rf "$venv_dir"
            apt_install python3-venv
            python3 -m venv "$venv_dir"
        fi
    fi
    if ! "$venv_dir/bin/python3" -c 'import yaml' >/dev/null 2>&1 \
        || [ "$("$venv_dir/bin/check-jsonschema" --version 2>/dev/null | awk '{print $NF}')" != "$CHECK_JSONSCHEMA_VERSION" ]; then
        echo "installing check-jsonschema==$CHECK_JSONSCHEMA_VERSION and PyYAML (PyPI) into $venv_dir"
        "$venv_dir/bin/python3" -m pip install -q --disable-pip-version-check \
            "check-jsonschema==$CHECK_JSONSCHEMA_VERSION" PyYAML
    fi
    export PATH="$venv_dir/bin:$PATH"
fi

if ! command -v docker-compose >/dev/null 2>&1; then
    echo "installing docker-compose (Debian)"
    apt_install docker-compose
fi

echo "python3:          $(command -v python3) ($(python3 --version 2>&1))"
echo "check-jsonschema: $(command -v check-jsonschema) ($(check-jsonschema --version 2>&1 | tail -n1))"
echo "docker-compose:   $(command -v docker-compose) ($(docker-compose version --short 2>/dev/null || echo '?'))"

# --- 1. compose spec schema --------------------------------------------------
step "1. docker-compose.yml against the Compose Specification schema"
check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml

# --- 2. docker-compose v1 parse ----------------------------------------------
step "2. docker-compose config -q (Debian docker-compose, copy without top-level name:)"
v1_copy="$(mktemp "${TMPDIR:-/tmp}/stall-lab-compose.XXXXXX.yml")"
trap 'rm -f "$v1_copy"' EXIT
# Drop only the top-level `name:` line (column 0); nested `name:` keys stay.
sed '/^name:/d' docker-compose.yml > "$v1_copy"
# --project-directory keeps ./config/... and `build: .` resolving against the
# repository, not against the temporary file's directory. The project name
# replaces the dropped `name:`. Unset JAEGER_VERSION so the pinned default is
# what gets checked.
env -u JAEGER_VERSION COMPOSE_PROJECT_NAME=stall-lab \
    docker-compose --project-directory "$repo_root" -f "$v1_copy" config -q
env -u JAEGER_VERSION COMPOSE_PROJECT_NAME=stall-lab \
    docker-compose --project-directory "$repo_root" -f "$v1_copy" config --services \
    | sed 's/^/service: /'
echo "ok"

# --- 3 + 4. jaeger.yaml, docker.toml, cross-file consistency ----------------
step "3. config/jaeger.yaml  4. config/docker.toml + cross-file consistency"
python3 - <<'PY'
import os
import re
import sys
import urllib.parse

import yaml

try:
    import tomllib  # Python >= 3.11 (Debian bookworm ships 3.11)
except ModuleNotFoundError:  # pragma: no cover - older Pythons
    import tomli as tomllib

failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


def port_of(endpoint):
    return int(str(endpoint).rsplit(":", 1)[1])


def host_of(endpoint):
    return str(endpoint).rsplit(":", 1)[0]


# ---- 3. jaeger.yaml
with open("config/jaeger.yaml") as f:
    jcfg = yaml.safe_load(f)
check(isinstance(jcfg, dict), "config/jaeger.yaml parses as a YAML mapping")

svc = jcfg.get("service", {})
for name in svc.get("extensions", []):
    check(name in (jcfg.get("extensions") or {}), f"service.extensions: {name} is declared under extensions:")
for pname, pipe in (svc.get("pipelines") or {}).items():
    for kind in ("receivers", "processors", "exporters"):
        for name in pipe.get(kind, []):
            check(name in (jcfg.get(kind) or {}),
                  f"pipeline {pname}: {kind[:-1]} {name} is declared under {kind}:")

protocols = jcfg["receivers"]["otlp"]["protocols"]
otlp_grpc = protocols["grpc"]["endpoint"]
otlp_http = protocols["http"]["endpoint"]
check(host_of(otlp_grpc) == "0.0.0.0" and port_of(otlp_grpc) == 4317,
      f"otlp grpc receiver listens on 0.0.0.0:4317 (got {otlp_grpc})")
check(host_of(otlp_http) == "0.0.0.0" and port_of(otlp_http) == 4318,
      f"otlp http receiver listens on 0.0.0.0:4318 (got {otlp_http})")

ext = jcfg["extensions"]
backends = ext["jaeger_storage"]["backends"]
for bname, b in backends.items():
    mt = (b.get("memory") or {}).get("max_traces")
    check(isinstance(mt, int) and mt > 0, f"memory backend {bname}: max_traces = {mt} (> 0)")
check(ext["jaeger_query"]["storage"]["traces"] in backends,
      "jaeger_query reads a declared storage backend")
check(jcfg["exporters"]["jaeger_storage_exporter"]["trace_storage"] in backends,
      "jaeger_storage_exporter writes a declared storage backend")
check(ext["jaeger_query"]["storage"]["traces"]
      == jcfg["exporters"]["jaeger_storage_exporter"]["trace_storage"],
      "UI reads the backend the exporter writes")
health_ep = ext["healthcheckv2"]["http"]["endpoint"]
check(ext["healthcheckv2"].get("use_v2") is True, "healthcheckv2 uses the v2 API (/status)")

# ---- 4. docker.toml
with open("config/docker.toml", "rb") as f:
    tcfg = tomllib.load(f)
check(True, "config/docker.toml parses as TOML")
# The schema is the built-in config/default.toml itself (one place for every
# key): docker.toml may only set keys that exist there.
with open("config/default.toml", "rb") as f:
    known = {section: set(keys) for section, keys in tomllib.load(f).items()}
for section, keys in tcfg.items():
    check(section in known, f"docker.toml: [{section}] is a known section")
    for key in keys if isinstance(keys, dict) else []:
        check(key in known.get(section, set()), f"docker.toml: {section}.{key} is a known key")

# ---- cross-file
with open("docker-compose.yml") as f:
    compose = yaml.safe_load(f)
services = compose["services"]
jaeger, app = services["jaeger"], services["stall-lab"]

ep = urllib.parse.urlsplit(tcfg["telemetry"]["otlp_endpoint"])
proto = tcfg["telemetry"]["otlp_protocol"]
check(ep.hostname in services, f"otlp_endpoint host '{ep.hostname}' is a compose service")
want_port = {"http/protobuf": port_of(otlp_http), "grpc": port_of(otlp_grpc)}.get(proto)
check(ep.port == want_port,
      f"otlp_endpoint port {ep.port} is jaeger's {proto} receiver port {want_port}")


def published(svc):
    out = {}
    for p in svc.get("ports", []):
        parts = str(p).split(":")
        check(len(parts) == 3 and parts[0] == "127.0.0.1",
              f"published port {p} is bound to the host's 127.0.0.1")
        out[int(parts[-1])] = p
    return out


app_ports = published(app)
for key in (("server", "listen"), ("admin", "listen"), ("telemetry", "console_listen")):
    listen = tcfg[key[0]][key[1]]
    check(host_of(listen) == "0.0.0.0", f"{'.'.join(key)} = {listen} listens beyond the container loopback")
    check(port_of(listen) in app_ports, f"{'.'.join(key)} port {port_of(listen)} is published")
listened = {port_of(tcfg[s][k]) for s, k in (("server", "listen"), ("admin", "listen"),
                                              ("telemetry", "console_listen"))}
for port in app_ports:
    check(port in listened, f"stall-lab's published port {port} is one it listens on")
jaeger_ports = published(jaeger)
check(port_of(ext["jaeger_query"]["http"]["endpoint"]) in jaeger_ports, "Jaeger UI port is published")
check(not ({4317, 4318} & set(jaeger_ports)), "OTLP ports are not published to the host")

check("/etc/jaeger/config.yaml" in " ".join(jaeger.get("command", [])),
      "jaeger is started with --config /etc/jaeger/config.yaml")
check(any(str(v).startswith("./config/jaeger.yaml:/etc/jaeger/config.yaml") for v in jaeger.get("volumes", [])),
      "config/jaeger.yaml is mounted at /etc/jaeger/config.yaml")
check(any(str(v).startswith("./config/docker.toml:/etc/stall-lab/docker.toml") for v in app.get("volumes", [])),
      "config/docker.toml is mounted at /etc/stall-lab/docker.toml")
check(str(port_of(health_ep)) in " ".join(jaeger["healthcheck"]["test"]),
      f"jaeger healthcheck probes the healthcheckv2 port {port_of(health_ep)}")
# The probe goes to the admin server: on the app server every 10 s probe is a
# traced request (an idle stack fills Jaeger's trace memory with probe traces,
# and probes show up as victims in the walkthrough), and it is the app's
# workers the lesson stalls on purpose.
admin_port = port_of(tcfg["admin"]["listen"])
app_port = port_of(tcfg["server"]["listen"])
check(f":{admin_port}/healthz" in " ".join(app["healthcheck"]["test"]),
      f"stall-lab healthcheck probes the admin server's /healthz (port {admin_port})")
check(f":{app_port}/" not in " ".join(app["healthcheck"]["test"]),
      "stall-lab healthcheck does not probe the app server")
with open("Dockerfile") as f:
    dockerfile = f.read()
hc = re.search(r"^HEALTHCHECK(?:[^\n]*\\\n)*[^\n]*", dockerfile, re.M)
check(hc is not None and f":{admin_port}/healthz" in hc.group(0),
      f"Dockerfile HEALTHCHECK probes the admin server's /healthz (port {admin_port})")
for name, svc in services.items():
    for v in svc.get("volumes", []):
        source = str(v).split(":")[0]
        if source.startswith("./"):
            check(os.path.exists(source), f"{name}: mounted path {source} exists")
check(app.get("init") is False, "stall-lab runs without an init shim (binary is PID 1)")
check(app["depends_on"]["jaeger"].get("condition") == "service_healthy",
      "stall-lab waits for a healthy jaeger")

# ---- the `load` profile: stall-lab load against the app, only on request
load = services.get("load", {})
check(load.get("profiles") == ["load"], "load runs only with --profile load")
cmd = [str(a) for a in load.get("command", [])]
check(cmd[:1] == ["load"], "load runs `stall-lab load`")
url = urllib.parse.urlsplit(cmd[cmd.index("--url") + 1]) if "--url" in cmd else None
check(url is not None and url.hostname == "stall-lab",
      "load's --url host is the stall-lab service")
check(url is not None and url.port == port_of(tcfg["server"]["listen"]),
      "load's --url port is stall-lab's server.listen port")
check(("--rate" in cmd) != ("--concurrency" in cmd), "load gives exactly one of --rate, --concurrency")
check(load.get("image") == app.get("image"), "load uses the stall-lab image")
check(load.get("depends_on", {}).get("stall-lab", {}).get("condition") == "service_healthy",
      "load waits for a healthy stall-lab")
check(not load.get("ports"), "load publishes no ports")

if failures:
    print(f"\n{len(failures)} check(s) failed", file=sys.stderr)
    sys.exit(1)
PY

printf '\nall container config checks passed\n'

"""Embedded copies of ``broker_config/mosquitto-prod.conf``, ``mosquitto-dashboard.conf``,
``mosquitto-bridge.conf`` and ``acl.conf``.

``fedmq broker init`` must work from an installed wheel, where ``broker_config/`` is absent;
a unit test keeps these strings identical to the files (edit the files, then copy here).
"""

PROD_CONF_TEMPLATE = """\
# fedmq production broker: TLS only, a password per identity, ACL per topic.
#
# This is a TEMPLATE: `fedmq broker init DIR` renders it into DIR/mosquitto.conf,
# replacing {listener} (port and optional bind address), {dir} (the provisioned
# directory), {user} (account the broker runs as) and {require_certificate}.
# Written for Mosquitto 2.0.x; comments must sit on their own lines.
# broker_config/README.md explains every setting and why.

# Security settings (auth, ACL, TLS) belong to the listener below and to no other:
# a second listener added later (say a loopback one for maintenance) cannot
# silently inherit or weaken them.
per_listener_settings true

# The only listener: MQTT over TLS (8883 is the IANA port for MQTT over TLS).
listener {listener}
protocol mqtt

# TLS: the broker certificate (SAN: localhost, 127.0.0.1 and --host) and its key,
# and the fedmq CA that clients verify it against (and that signs client certs).
cafile {dir}/ca.crt
certfile {dir}/broker.crt
keyfile {dir}/broker.key
# Minimum TLS version: 1.2 (1.0/1.1 are deprecated, RFC 8996).
tls_version tlsv1.2

# Client certificates: "false" = passwords authenticate, TLS only encrypts and
# authenticates the broker. "true" = mutual TLS: a client must also present a
# certificate signed by the CA (each identity gets one in its directory); the
# password is still checked. Enable with `fedmq broker init --require-certificate`.
require_certificate {require_certificate}

# No anonymous clients: every connection needs a username from the password file.
allow_anonymous false

# The client id is the username: a client cannot take over another's id (MQTT lets a
# second connection with an id close the first, so a device connecting as "aggregator"
# would disconnect the aggregator). Provisioned identities already use their name as
# both; one identity therefore has one connection at a time.
use_username_as_clientid true

# PBKDF2-SHA512 ($7$) hashes, one line per identity, kept in sync by
# `fedmq broker init` / `fedmq device add`. Reload after changes: kill -HUP.
password_file {dir}/passwd

# What each identity may publish and subscribe to (see acl.conf).
acl_file {dir}/acl.conf

# Started as root, Mosquitto drops to this account before reading the files above:
# it must be able to read broker.key, passwd and acl.conf (chown them if needed).
user {user}

# Retained global models survive a broker restart; agents also get them from the
# aggregator's re-publication, so this is a convenience, not a requirement.
persistence true
persistence_location {dir}/data/

# Largest MQTT packet (the whole packet, headers included) a client may send; a
# larger one disconnects it. 2,000,000 bytes is Mosquitto 2.1's default: fedmq sends
# payloads over 1 MB as chunks (shared/mqtt/chunking.py), and MQTT v5 clients learn
# the limit from the CONNACK and chunk below it.
max_packet_size 2000000

# Flow control as the development broker (see mosquitto-dev.conf), plus a byte cap:
# the QoS 1 messages queued for one slow or stalled subscriber cost at most 20,000
# messages and 128 MiB. Beyond that Mosquitto drops them (fedmq's receipts and the
# agents' outboxes re-send what was lost). The count is sized for fleets: when the
# aggregator subscribes it receives every device's retained status at once, and with
# 1,000 here the statuses of devices beyond ~1,100 were dropped silently (docs/scaling.md);
# raise it to ≥ 2 × devices for fleets over 10,000. The byte cap bounds the memory.
max_inflight_messages 100
max_queued_messages 20000
max_queued_bytes 134217728

# Heap the broker may allocate in all, retained messages included: Mosquitto 2.0
# has no limit of their own, and its ACL cannot forbid the retain flag on a topic a
# client may write (the aggregator clears retained updates it receives). Over the
# limit, the message being received is dropped and its publisher disconnected.
# Raise it for federations whose retained models and queues need more.
memory_limit 1073741824
retain_available true
set_tcp_nodelay true

# Log to stderr (the systemd journal under a service manager).
log_dest stderr
log_type error
log_type warning
log_type notice
log_type information
log_timestamp_format %Y-%m-%dT%H:%M:%S
# Connects, disconnects and refused logins are the audit trail of who joined.
connection_messages true
"""

DASHBOARD_CONF_TEMPLATE = """\
# fedmq dashboard listeners: MQTT over secure WebSockets (wss) for the browser, and the
# static page (docs/dashboard.md).
#
# This is a TEMPLATE: `fedmq broker init DIR` appends it, rendered, to DIR/mosquitto.conf
# (unless --no-dashboard), filling in the ports (--dashboard-port, --dashboard-page-port),
# the optional address (--bind) and DIR. It must come after every global setting: with
# per_listener_settings true, the security settings below belong to their listener only.
# broker_config/README.md explains every setting.

# 1. MQTT over WebSockets with TLS: the page's connection to the broker.
listener {dashboard_listener}
protocol websockets

# The same certificate as the MQTT listener. Mosquitto supports only cafile, certfile,
# keyfile and the cipher lists on a WebSockets listener (no tls_version, no
# require_certificate): browsers log in with a password only, hence the next lines.
cafile {dir}/ca.crt
certfile {dir}/broker.crt
keyfile {dir}/broker.key

# Only the read-only monitor identity can log in here: this password file holds its line
# alone, so a device's password, even a leaked one, opens nothing on this port.
allow_anonymous false
password_file {dir}/dashboard.passwd
acl_file {dir}/acl.conf

# As on the MQTT listener: no client can take another's client id (one connection per
# login: a second dashboard tab, or `fedmq monitor`, takes over the first's connection).
use_username_as_clientid true

# The page over HTTPS too, for browsers that reach it over HTTP/1.1. Debian's Mosquitto
# 2.0.11 offers HTTP/2 on TLS listeners and then fails to serve files over it (browsers
# show ERR_HTTP2_PROTOCOL_ERROR; eclipse-mosquitto/mosquitto#2251), hence listener 2.
http_dir {dir}/dashboard

# 2. The page itself over plain HTTP: static files copied into DIR/dashboard by
# `broker init` (the broker never reads the Python installation), whose config.json
# sends the browser to listener 1. No MQTT login works here (an empty password file):
# the password only ever travels over TLS.
listener {dashboard_page_listener}
protocol websockets
http_dir {dir}/dashboard
allow_anonymous false
password_file {dir}/nobody.passwd
use_username_as_clientid true
"""

BRIDGE_CONF_TEMPLATE = """\
# fedmq site bridge: this (site) broker's connection to the central broker (docs/sites.md).
#
# This is a TEMPLATE: `fedmq broker init DIR --site NAME --upstream HOST:PORT --uplink BUNDLE`
# appends it, rendered, to the site's DIR/mosquitto.conf, last (every line after
# `connection` belongs to the bridge), filling in the site's name, the --upstream address,
# DIR (whose uplink/ holds the site's credentials for the central broker, copied from the
# bundle `fedmq broker add-site NAME` wrote on the central side), the site's uplink
# password, the client ids, the notification topic, the backoff and the topic lines (one
# per topic pattern that crosses, generated from shared/protocol/topics.py).
# broker_config/README.md and docs/sites.md explain every setting.
connection fedmq-site-{site}
address {address}

# The site's login on the central broker. The central broker takes the client id from the
# login (use_username_as_clientid), so remote_clientid is the login too: one bridge per
# site. The local client id holds a ':', which no provisioned login can (fedmq names are
# [A-Za-z0-9_.-]), so no local device can take over the bridge's session here.
remote_username {site}
remote_password {remote_password}
remote_clientid {site}
local_clientid {local_clientid}

# TLS to the central broker: verify it against the central CA (hostname included), and
# present the site's client certificate (for a central broker with --require-certificate).
bridge_cafile {dir}/uplink/ca.crt
bridge_certfile {dir}/uplink/client.crt
bridge_keyfile {dir}/uplink/client.key
bridge_tls_version tlsv1.2
bridge_insecure false

# MQTT 3.1.1, not 5: a Mosquitto 2.0 bridge speaking MQTT 5 sends no session expiry
# interval, so the central broker ends the bridge's session at every disconnect and drops
# what it had queued for the site (eclipse/mosquitto#1632, #2424, #2980; Mosquitto 2.1
# adds bridge_session_expiry_interval). 3.1.1 with cleansession false keeps the session.
bridge_protocol_version mqttv311
# Announce a bridge (not an ordinary client) to the central Mosquitto: retained messages
# keep their retain flag across the bridge and messages never loop back.
try_private true

# A persistent session on both sides: QoS 1 messages for the site wait on the central
# broker while the uplink is down, the site's partials wait here (in this broker's
# persistence file across a restart), each bounded by max_queued_messages and
# max_queued_bytes above.
cleansession false
local_cleansession false

# Reconnect with jittered exponential backoff: base and cap in seconds.
start_type automatic
restart_timeout {restart_timeout}
keepalive_interval 60

# The central broker disconnects a client that sends a packet over its max_packet_size
# (2,000,000 bytes, as here): such a message is dropped here instead of cutting the bridge.
# fedmq chunks payloads over 1 MB, so none of its messages is near it.
bridge_max_packet_size 2000000
bridge_outgoing_retain true
bridge_attempt_unsubscribe false

# The bridge's state, retained "1" (connected) or "0" (its will on the central broker),
# on the site's own topic: the central broker's ACL lets the site write there only.
notifications true
notifications_local_only false
notification_topic {notification_topic}

# What crosses: "in" central -> site, "out" site -> central. Nothing a device publishes
# (updates, statuses, inference traffic) matches an "out" line. QoS 1, except the global
# model's retained frames (QoS 0): the central broker queues none of them while the uplink
# is down, and the bridge's subscription at reconnect brings the latest one alone.
{topics}
"""

ACL = """\
# fedmq ACL (Mosquitto 2.0 acl_file). Rendered unchanged by `fedmq broker init`.
# Anything not granted here is denied. %u is the authenticated username; every
# device logs in with its own username, which is also its fedmq client id, so the
# patterns at the end cover every device with one set of rules.
# The federation level is "+": one provisioned broker serves one trust domain.

# The aggregator runs the federation: announces rounds, publishes global models,
# status, metrics and receipts, and reads every update and agent status.
user aggregator
topic readwrite fl/v1/#

# Read-only monitor (dashboards, `fedmq monitor`, mosquitto_sub): everything except
# the updates themselves, which are derived from private training data (gradient
# inversion can reconstruct samples), so only the aggregator may read them.
# Deny lines also cancel the device patterns below for this user: the monitor
# cannot publish an update or a status of its own.
user monitor
topic deny fl/v1/+/round/+/update/+
topic deny fl/v1/+/round/+/update/+/chunk/+
topic deny fl/v1/+/agents/monitor/status
# Inference requests carry a device's inputs (camera frames...), answers what it saw.
topic deny fl/v1/+/infer/#
topic read fl/v1/#

# Devices. Publish: only their own update and their own (retained) status. Read:
# round announcements, the global model (full and as a delta) and its meta, the
# aggregator's status and their own receipts. Not others' updates, not others' receipts,
# and no write on global/# or round/+/start, so no device can publish a model or a round.
pattern write fl/v1/+/round/+/update/%u
# Payloads over the packet limit travel in chunks (shared/mqtt/chunking.py).
# An acl_file cannot forbid the retain flag on a topic a client may write, so a
# device could park retained update chunks in the broker for every new subscriber:
# the aggregator drops and clears any retained update it receives (it subscribes
# with retain-as-published, shared/mqtt/chunk_receiver.py), and memory_limit in
# mosquitto.conf bounds what the broker holds meanwhile.
pattern write fl/v1/+/round/+/update/%u/chunk/+
pattern write fl/v1/+/agents/%u/status
pattern read fl/v1/+/round/+/start
pattern read fl/v1/+/global/meta
pattern read fl/v1/+/global/model
pattern read fl/v1/+/global/model/chunk/+
pattern read fl/v1/+/global/delta
pattern read fl/v1/+/global/delta/chunk/+
pattern read fl/v1/+/aggregator/status
pattern read fl/v1/+/round/+/receipt/%u

# On-device inference. A device's inference server (`fedmq-agent serve`) is a second
# identity, NAME-infer, provisioned by `fedmq device add NAME`: each process has its own
# login, so neither takes over the other's connection (use_username_as_clientid). Its
# topics are keyed by its login: fl/v1/FED/infer/NAME-infer/request/REQUESTER, answered
# on .../infer/NAME-infer/response/REQUESTER. The last level is bound to the requester's
# login, so a requester can neither pose as another nor read another's answers, and
# the server budgets each requester. %u may sit inside a level: for the device NAME,
# "%u-infer" is its own server. No device reads another's requests or answers; the
# monitor reads none; the aggregator (fl/v1/#) may ask any server.
# The server (login NAME-infer) reads the ONNX model and the requests addressed to it,
# and answers them. (For a device's own login these name topics no server uses: a
# server's login ends in "-infer", and `fedmq device add` refuses such device names.)
pattern read fl/v1/+/global/onnx
pattern read fl/v1/+/global/onnx/chunk/+
pattern read fl/v1/+/infer/%u/request/+
pattern read fl/v1/+/infer/%u/request/+/chunk/+
pattern write fl/v1/+/infer/%u/response/+
# The device (login NAME) asks its own server, and only as itself.
pattern write fl/v1/+/infer/%u-infer/request/%u
pattern write fl/v1/+/infer/%u-infer/request/%u/chunk/+
pattern read fl/v1/+/infer/%u-infer/response/%u
# The device patterns above also apply to NAME-infer; fedmq refuses client ids ending in
# "-infer" on the training topics (shared/protocol/topics.py), so a server never trains.
"""

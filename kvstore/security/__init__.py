"""Security building blocks (CONTRACT §10), used by the transport, the runtime and the API:

- `users`: the users file, token authentication (scrypt + a keyed cache), roles and key
  prefixes (`authorize`), the bad-credential limiter;
- `signing`: HMAC request signing between peers with the cluster secret (and the older
  shared cluster token);
- `tls`: the server/client SSL contexts of a node and the per-connection certificate
  checks;
- `certs`: `kvstore certs init` — a CA, node and client certificates;
- `exposure`: the start-up rule (peers on other hosts need peer authentication).

A layer just above config: imports kvstore.errors, kvstore.ids, kvstore.config, the
standard library, yaml and cryptography — never the transport, runtime or API.
"""

from kvstore.security.exposure import check_exposure
from kvstore.security.users import Action, Authenticator, KeyRange, Role, User, authorize

__all__ = ["Action", "Authenticator", "KeyRange", "Role", "User", "authorize", "check_exposure"]

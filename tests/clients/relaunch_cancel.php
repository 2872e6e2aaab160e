<?php
// A Gandi API v1 client as PHP scripts were written against it (PHP's xmlrpc extension
// over an HTTP stream), driving the seed's operation_list example (a dateTime filter),
// then relaunch -> details -> cancel -> details -> list(state=CANCEL) -> cancel again,
// with no pause between calls. Prints one JSON
// object: each step's answer (or its fault) and how long it took.
// tests/test_read_your_writes.py runs it and checks the answers.
//
// usage: php relaunch_cancel.php URL LOGIN API_KEY OPID TYPE
if ($argc !== 6) {
    fwrite(STDERR, "usage: php relaunch_cancel.php URL LOGIN API_KEY OPID TYPE\n");
    exit(2);
}
[, $url, $login, $apikey, $opid, $type] = $argv;
$opid = (int) $opid;
$steps = [];

// One call; a fault is recorded as such (the caller decides whether it ends the run).
function step(string $name, string $method, array $params): array
{
    global $url, $steps;
    $started = microtime(true);
    $context = stream_context_create(['http' => [
        'method' => 'POST',
        'header' => "Content-Type: text/xml\r\n",
        'content' => xmlrpc_encode_request($method, $params),
    ]]);
    $body = file_get_contents($url, false, $context);
    if ($body === false) {
        fwrite(STDERR, "$method: no answer from $url\n");
        exit(1);
    }
    $reply = xmlrpc_decode($body);
    $step = ['step' => $name, 'seconds' => microtime(true) - $started];
    if (is_array($reply) && xmlrpc_is_fault($reply)) {
        $step['fault'] = ['code' => $reply['faultCode'], 'string' => $reply['faultString']];
    } else {
        $step['result'] = $reply;
    }
    $steps[] = $step;
    return $step;
}

function finish(): void
{
    global $steps;
    echo json_encode(['client' => 'php xmlrpc ' . phpversion('xmlrpc'), 'steps' => $steps]), "\n";
    exit(0);
}

// Gandi API v1: login(login, password), the password being the API key.
$loggedin = step('login', 'login', [$login, $apikey]);
if (isset($loggedin['fault'])) {
    finish();
}
$session = $loggedin['result'];
// The seed's filter, its dates a day either side of now.
$after = gmdate('Ymd\TH:i:s', time() - 86400);
$before = gmdate('Ymd\TH:i:s', time() + 86400);
xmlrpc_set_type($after, 'datetime');
xmlrpc_set_type($before, 'datetime');
$filter = ['updated_after' => $after, 'updated_before' => $before, 'state' => 'ERROR',
           'type' => $type];
foreach ([
    ["list (the seed's filter)", 'operation_list', [$session, $filter]],
    ['relaunch', 'operation_relaunch', [$session, $opid, ['auth_code' => 'abababab']]],
    ['details after relaunch', 'operation_details', [$session, $opid]],
    ['cancel', 'operation_cancel', [$session, $opid]],
    ['details after cancel', 'operation_details', [$session, $opid]],
    ['list cancelled', 'operation_list', [$session, ['state' => 'CANCEL']]],
] as [$name, $method, $params]) {
    if (isset(step($name, $method, $params)['fault'])) {
        finish();
    }
}
step('cancel again', 'operation_cancel', [$session, $opid]);
finish();

#!/usr/bin/perl
# A Gandi API v1 client as Perl scripts were written against it (XMLRPC::Lite), driving
# the seed's operation_list example (a dateTime filter), then relaunch -> details ->
# cancel -> details -> list(state=CANCEL) -> cancel again, with no pause between calls. Prints one JSON object: each step's answer (or its fault) and how
# long it took. tests/test_read_your_writes.py runs it and checks the answers.
#
# usage: relaunch_cancel.pl URL LOGIN API_KEY OPID TYPE
use strict;
use warnings;
use JSON::PP;
use POSIX qw(strftime);
use Time::HiRes qw(time);
use XMLRPC::Lite;

my ($url, $login, $apikey, $opid, $type) = @ARGV;
die "usage: $0 URL LOGIN API_KEY OPID TYPE\n" unless defined $type;
my $proxy = XMLRPC::Lite->proxy($url);
my @steps;

# One call; a fault is recorded as such, and ends the run unless it was expected.
sub step {
    my ($name, $method, @args) = @_;
    my $started = time;
    my $reply = $proxy->call($method, @args);
    my %step = (step => $name, seconds => time - $started);
    if ($reply->fault) {
        $step{fault} = { code => $reply->faultcode + 0, string => $reply->faultstring };
    } else {
        $step{result} = $reply->result;
    }
    push @steps, \%step;
    return \%step;
}

sub finish {
    print JSON::PP->new->canonical->encode({ client => "perl XMLRPC::Lite $XMLRPC::Lite::VERSION",
                                             steps => \@steps }), "\n";
    exit 0;
}

# Gandi API v1: login(login, password), the password being the API key.
my $loggedin = step("login", "login", $login, $apikey);
finish() if $loggedin->{fault};
my $session = $loggedin->{result};
# The seed's filter, its dates a day either side of now (the seed wrote "datetime";
# today's XMLRPC::Lite spells the type "dateTime").
my $filter = {};
$filter->{updated_after} = XMLRPC::Data->type("dateTime")->value(
    strftime("%Y%m%dT%H:%M:%S", gmtime(time - 86400)));
$filter->{updated_before} = XMLRPC::Data->type("dateTime")->value(
    strftime("%Y%m%dT%H:%M:%S", gmtime(time + 86400)));
$filter->{state} = "ERROR";
$filter->{type} = $type;
for my $call (
    ["list (the seed's filter)", "operation_list", $session, $filter],
    ["relaunch", "operation_relaunch", $session, $opid, { auth_code => "abababab" }],
    ["details after relaunch", "operation_details", $session, $opid],
    ["cancel", "operation_cancel", $session, $opid],
    ["details after cancel", "operation_details", $session, $opid],
    ["list cancelled", "operation_list", $session, { state => "CANCEL" }],
) {
    finish() if step(@$call)->{fault};
}
step("cancel again", "operation_cancel", $session, $opid);
finish();

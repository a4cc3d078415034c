defmodule MaculaQuic.NativeTest do
  use ExUnit.Case, async: true

  test "the NIF library is loaded and answers" do
    assert MaculaQuic.Native.ping() == :ok
  end
end
